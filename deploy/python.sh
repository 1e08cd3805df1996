#!/usr/bin/env bash
# Prints the Python interpreter shimd's virtualenv is made with: $PYTHON when set, else the
# distribution's /usr/bin/python3, else the first python3 on PATH; each must be 3.11 or newer.
# The distribution's build comes first because it is built with profile-guided optimisation and LTO
# while a source build (pyenv's default) is not: on one machine shimd used 17-20% less CPU per pod
# start and teardown on Debian 12's 3.11.2 than on pyenv's 3.11.7 (docs/operations.md).
set -euo pipefail
for p in ${PYTHON:-} /usr/bin/python3 python3; do
    if "$p" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "$p"
        exit 0
    fi
done
echo "no Python 3.11 or newer with ensurepip (Debian: apt install python3 python3-venv)" >&2
exit 1
