import sys

from shimd.cli import main

sys.exit(main())
