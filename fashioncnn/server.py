"""`python -m fashioncnn.server`: the same as `fashioncnn server` (fashioncnn.cluster.server)."""

import sys

from fashioncnn.cluster.server import main

if __name__ == "__main__":
    sys.exit(main())
