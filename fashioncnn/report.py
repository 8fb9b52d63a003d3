"""`python -m fashioncnn.report`: the same as `fashioncnn report` (fashioncnn.results.report)."""

import sys

from fashioncnn.results.report import main

if __name__ == "__main__":
    sys.exit(main())
