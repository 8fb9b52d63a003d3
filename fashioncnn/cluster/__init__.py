"""Running fashioncnn for a team: the shared tracking server (server) and a one-node SLURM cluster (slurm).

Imports fashioncnn.tracking and fashioncnn.core. Imported only by the command line.
"""
