"""`python -m shims.runc` is the runc shim."""

import sys

from shims.runc.shim import main

sys.exit(main())
