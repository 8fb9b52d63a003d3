"""`python -m fashioncnn.retrain`: the same as `fashioncnn retrain` (fashioncnn.results.retrain)."""

import sys

from fashioncnn.results.retrain import main

if __name__ == "__main__":
    sys.exit(main())
