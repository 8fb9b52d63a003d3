"""What a set of runs answers beyond a leaderboard: the Pareto front of accuracy against size and time, and
which swept keys mattered.

Imported by fashioncnn.sweep (a sweep's parent run shows both when it closes) and fashioncnn.results (the
report); imports fashioncnn.tracking and fashioncnn.core only.
"""
