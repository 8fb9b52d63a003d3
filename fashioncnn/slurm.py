"""`python -m fashioncnn.slurm`: the same as `fashioncnn slurm` (fashioncnn.cluster.slurm)."""

import sys

from fashioncnn.cluster.slurm import main

if __name__ == "__main__":
    sys.exit(main())
