"""``python -m qmig`` runs the same command line as the ``qmig`` script."""

import sys

from qmig.cli import main

if __name__ == "__main__":
    sys.exit(main())
