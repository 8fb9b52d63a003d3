"""`python -m fashioncnn.predict`: the same as `fashioncnn predict` (fashioncnn.serving.predict)."""

import sys

from fashioncnn.serving.predict import main

if __name__ == "__main__":
    sys.exit(main())
