"""`python -m deployments.cli ARGS`: the same as the `avatar-serve ARGS` command."""

import sys

from deployments.cli import main

if __name__ == "__main__":
    sys.exit(main())
