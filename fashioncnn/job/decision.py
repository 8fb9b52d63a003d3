"""A job's decision: what the sweep's plan decided for one job, handed to it as one value.

The plan (fashioncnn.sweep.plan) decides each job once, in the launching process: which experiment its
run goes to, its fingerprint, whether it resumes a run, the sweep and parent run it belongs to, and for a
search the Optuna trial it reports to. The launch adds the decision to the job's overrides as
`hydra.job.env_set.FASHIONCNN_DECISION=<json>`: in the job's own Hydra config, in this process or in a
launcher's worker on another machine, and, as every `hydra.` override, left out of the launch log the
user reads. conf/config.yaml declares the key (empty): a job that Hydra runs without a plan has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from fashioncnn.tracking.names import DECISION_ENV


@dataclass(frozen=True)
class TrialRef:
    """The Optuna trial a search's job reports each epoch to (hydra/sweeper=optuna)."""

    study: str
    storage: str
    trial_id: int


@dataclass(frozen=True)
class Decision:
    experiment_id: str
    fingerprint: str  # of the job's effective config: what identifies its run (fashioncnn.sweep.plan.fingerprint)
    resume_run_id: str | None = None  # an unfinished run with a checkpoint: this job goes on with it
    sweep_id: str | None = None  # a -m sweep's jobs share it (the sweep_id tag), with their parent run
    parent_run_id: str | None = None
    trial: TrialRef | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Decision:
        fields = json.loads(text)
        trial = fields.pop("trial", None)
        return cls(**fields, trial=TrialRef(**trial) if trial else None)

    def override(self) -> str:
        """The job's override that carries this decision."""
        return f"hydra.job.env_set.{DECISION_ENV}={literal(self.to_json())}"

    @classmethod
    def of_this_job(cls) -> Decision | None:
        """This job's decision, from its Hydra config; None when Hydra runs the app without a plan."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        text = HydraConfig.get().job.env_set.get(DECISION_ENV)
        return cls.from_json(text) if text else None


def literal(text: str) -> str:
    """`text` as an override's value that arrives unchanged: quoted for Hydra's grammar, and with `${` escaped,
    so that OmegaConf does not resolve a user's interpolation (a job's own override) where the value is read."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text.replace("${", "\\${"), Quote.single).with_quotes()
