"""Leases: a training job's claim on its run, so that no two processes train the same job.

While a job trains, its run carries a `heartbeat` tag (unix time) renewed every `lease.heartbeat_seconds`
by a background thread. A RUNNING run whose heartbeat is younger than `lease.seconds` is held by a live
process somewhere: the plan leaves it alone ("running elsewhere"); an older heartbeat means its process
is gone, and the run is resumed (or trained afresh). Runs without the tag (older versions) are treated
as before: resumable when they left a checkpoint.

Two commands that plan the same sweep at the same moment both decide "train": each job settles it when
it starts. A new run is claimed by creating it; after a short pause, of the live runs with the same
fingerprint, the earliest (start time, then run id) trains and the others delete their claim and leave.
A resumed run is claimed by writing an owner tag; after the pause, the owner read back trains.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "heartbeat"
OWNER_TAG = "lease.owner"
# Long enough for a competing claim made at about the same moment (its start time stamped before ours,
# its run created after) to be visible to both claimants: that gap is milliseconds. Every new job waits it once.
SETTLE_SECONDS = 0.5
PROCESS_OWNER = uuid.uuid4().hex[:12]


def heartbeat_tags() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}", OWNER_TAG: PROCESS_OWNER}


def heartbeat_age(run: Run, now: float | None = None) -> float | None:
    """Seconds since the run's last heartbeat; None for a run without one (an older version's)."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    if beat is None:
        return None
    try:
        return (now or time.time()) - float(beat)
    except ValueError:
        return None


def held_elsewhere(run: Run, lease_seconds: float, now: float | None = None) -> bool:
    """A RUNNING run whose heartbeat is younger than the lease: a live process is training it."""
    age = heartbeat_age(run, now)
    return run.info.status == "RUNNING" and age is not None and age < lease_seconds


def wins_new_run(client: MlflowClient, experiment_id: str, fingerprint: str, mine: Run, lease_seconds: float,
                 force: bool = False) -> bool:
    """After creating run `mine`: whether it is the one to train (no earlier live run of the same job, and no
    FINISHED one: the plan saw none, so another command finished it since; with `force`, one since this run began)."""
    time.sleep(SETTLE_SECONDS)
    others = client.search_runs([experiment_id], f"tags.fingerprint = '{fingerprint}'", max_results=1000)
    key = (mine.info.start_time, mine.info.run_id)
    for other in others:
        if other.info.run_id == mine.info.run_id:
            continue
        if other.info.status == "FINISHED" and (not force or (other.info.end_time or 0) >= key[0]):
            return False
        if held_elsewhere(other, lease_seconds) and (other.info.start_time, other.info.run_id) < key:
            return False
    return True


def wins_resume(client: MlflowClient, run_id: str, lease_seconds: float) -> bool:
    """Claim run `run_id` for a resume; False when another live process holds or took it."""
    run = client.get_run(run_id)
    if held_elsewhere(run, lease_seconds) and run.data.tags.get(OWNER_TAG) != PROCESS_OWNER:
        return False
    if run.info.status == "FINISHED":
        return False
    client.set_tag(run_id, OWNER_TAG, PROCESS_OWNER)
    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
    time.sleep(SETTLE_SECONDS)
    return client.get_run(run_id).data.tags.get(OWNER_TAG) == PROCESS_OWNER


class Heartbeat:
    """Renews the run's heartbeat tag from a background thread until stopped; an unreachable store only delays it."""

    def __init__(self, client: MlflowClient, run_id: str, every_seconds: float) -> None:
        self.client, self.run_id, self.every_seconds = client, run_id, every_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_seconds):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as error:  # the store is away; the lease lapses only if it stays away
                log.debug("heartbeat not delivered: %s", error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
