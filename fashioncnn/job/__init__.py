"""One job's run: Hydra's task function (app), the run's life in MLflow (run), its checkpoints, its lease, its pruner.

Imports fashioncnn.serving, fashioncnn.tracking and fashioncnn.core. Imported by fashioncnn.sweep, which launches jobs.
"""
