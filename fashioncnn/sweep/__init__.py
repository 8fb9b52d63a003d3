"""A command from its overrides to its exit code: overrides, preflight, the plan, the estimate, the launch, the
parent run, the summary, and the Optuna search.

Imports fashioncnn.job, fashioncnn.serving, fashioncnn.tracking and fashioncnn.core. Imported by the command
line, the Hydra plugins (hydra_plugins.fashioncnn_plugins) and fashioncnn.results (retrain runs a sweep).
"""
