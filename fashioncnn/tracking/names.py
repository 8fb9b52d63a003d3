"""Every name that ties runs together: the MLflow tags fashioncnn writes and reads, and the environment
variable that carries a plan's decision to its job. One place, so that a writer and its readers never
spell a name two ways.
"""

from __future__ import annotations

# Tags: what the UI, reports, retrain and the plan filter on.
ROLE_TAG = "fashioncnn.role"  # "parent" for a sweep's parent run, "job" for each model's run
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "sweep_id"
FINGERPRINT_TAG = "fingerprint"
SWEEP_FINGERPRINT_TAG = "sweep_fingerprint"  # on a parent run: which jobs (or which study) it stands for
DIVERGED_TAG = "diverged"
DIVERGED_REASON_TAG = "diverged_reason"
# The epoch the divergence guard stopped a run in: its metrics there are of part of an epoch, which the
# run did not reach (pruners and Optuna trials leave it out).
CUT_SHORT_EPOCH_TAG = "cut_short_epoch"
PRUNED_TAG = "pruned"  # stopped early by a pruner: never picked by retrain or the registry
PRUNED_REASON_TAG = "pruned_reason"
# The epoch a pruned run stopped after (whichever pruner stopped it): what the summary's saving counts from.
PRUNED_EPOCH_TAG = "pruned_epoch"
# The store pruners' details of their verdict.
PRUNED_DETAIL_TAGS = ("pruned_rule", "pruned_metric", "pruned_value", "pruned_threshold", "pruned_siblings")
# Leases (fashioncnn.job.lease): the holder's last sign of life (unix time) and who it is.
HEARTBEAT_TAG = "heartbeat"
OWNER_TAG = "lease.owner"
HOLDER_TAG = "lease.holder"  # host, PID and the process's start time: a holder on this host can be checked
# An Optuna trial's run.
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial"

# A job's decision (fashioncnn.job.decision), handed to it in its Hydra config as hydra.job.env_set's key.
DECISION_ENV = "FASHIONCNN_DECISION"
