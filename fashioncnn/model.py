"""`python -m fashioncnn.model`: the same as `fashioncnn model` (fashioncnn.core.model)."""

import sys

from fashioncnn.core.model import main

if __name__ == "__main__":
    sys.exit(main())
