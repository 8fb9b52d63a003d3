"""`python -m fashioncnn.register`: the same as `fashioncnn register` (fashioncnn.serving.register)."""

import sys

from fashioncnn.serving.register import main

if __name__ == "__main__":
    sys.exit(main())
