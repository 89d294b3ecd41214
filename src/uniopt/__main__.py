"""``python -m uniopt``: the ``uniopt`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
