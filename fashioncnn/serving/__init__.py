"""Trained models as MLflow models: the flavor a job logs (flavor), the registry (register), predictions (predict).

Imports fashioncnn.tracking and fashioncnn.core. Imported by fashioncnn.job (a job logs its model) and the commands.
"""
