"""`python -m fashioncnn.links`: the same as `fashioncnn links` (fashioncnn.tracking.links)."""

import sys

from fashioncnn.tracking.links import main

if __name__ == "__main__":
    sys.exit(main())
