"""Leases: a training job's claim on its run, so that no two processes train the same job.

While a job trains, its run carries a `heartbeat` tag (unix time) renewed every `lease.heartbeat_seconds`
by a background thread, and a `lease.holder` tag: the host, PID and start time of the process that
trains it. A RUNNING run whose heartbeat is younger than `lease.seconds` is held by a live process: the
plan leaves it alone ("running elsewhere") and the sweep says where. Two things end a lease: a heartbeat
older than `lease.seconds` (the holder is gone, wherever it ran), or, on the holder's own host, no live
process with its PID and start time (a `kill -9`, a crash: the run is taken over at once). A run
without the tags (an older version's) is resumable when it left a checkpoint.

Two commands that plan the same sweep at the same moment both decide "train": each job settles it when
it starts. A new run is claimed by creating it; after a short pause, of the live runs with the same
fingerprint, the earliest (start time, then run id) trains and the others delete their claim and leave.
A resumed run is claimed by writing an owner tag; after the pause, the owner read back trains.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from fashioncnn.tracking.names import FINGERPRINT_TAG, HEARTBEAT_TAG, HOLDER_TAG, OWNER_TAG

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Long enough for a competing claim made at about the same moment (its start time stamped before ours,
# its run created after) to be visible to both claimants: that gap is milliseconds. Every new job waits it once.
SETTLE_SECONDS = 0.5
PROCESS_OWNER = uuid.uuid4().hex[:12]


def _started(pid: int) -> str:
    """When process `pid` started, as recorded in a holder (a reused PID is another process: it started later)."""
    import psutil

    return f"{psutil.Process(pid).create_time():.2f}"


def this_holder() -> str:
    """This process as a lease holder: host, PID and start time."""
    return f"{socket.gethostname()} {os.getpid()} {_started(os.getpid())}"


def holder_of(run: Run) -> tuple[str, int, str] | None:
    """The (host, PID, start time) holding the run, None when the run does not say (an older version's run)."""
    return _parsed(run.data.tags.get(HOLDER_TAG, ""))


def _parsed(holder_text: str) -> tuple[str, int, str] | None:
    parts = holder_text.rsplit(" ", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def holder_gone(run: Run) -> bool:
    """Whether the run's holder is known to be gone: it ran on this host, and no live process has its PID and
    start time. A holder on another host cannot be seen from here: only its heartbeat tells."""
    return holder_gone_text(run.data.tags.get(HOLDER_TAG, ""))


def holder_gone_text(holder_text: str, elsewhere_gone: bool = False) -> bool:
    """`holder_gone` for a holder as recorded ("host PID start"); a holder on another host counts as gone
    only with `elsewhere_gone`, and one that says nothing readable as still there."""
    import psutil

    holder = _parsed(holder_text)
    if holder is None:
        return False
    host, pid, started = holder
    if host != socket.gethostname():
        return elsewhere_gone
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or _started(pid) != started
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to look at (another user's process): alive, as far as we can tell
        return False


def where(run: Run) -> str:
    """Where the run's holder is, for a person: "host (pid N)", or "another process" for an older version's run."""
    holder = holder_of(run)
    return f"{holder[0]} (pid {holder[1]})" if holder else "another process"


def heartbeat_tags() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}", OWNER_TAG: PROCESS_OWNER, HOLDER_TAG: this_holder()}


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
    """A RUNNING run whose heartbeat is younger than the lease and whose holder is not known to be gone:
    a live process is training it."""
    age = heartbeat_age(run, now)
    return run.info.status == "RUNNING" and age is not None and age < lease_seconds and not holder_gone(run)


def wins_new_run(client: MlflowClient, experiment_id: str, fingerprint: str, mine: Run, lease_seconds: float,
                 force: bool = False) -> bool:
    """After creating run `mine`: whether it is the one to train (no earlier live run of the same job, and no
    FINISHED one: the plan saw none, so another command finished it since; with `force`, one since this run began)."""
    time.sleep(SETTLE_SECONDS)
    others = client.search_runs([experiment_id], f"tags.{FINGERPRINT_TAG} = '{fingerprint}'", max_results=1000)
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
    from mlflow.entities import RunTag

    # One request: a planner that looks in between sees a fresh heartbeat and a live holder, never a mix.
    # A claimant that loses leaves its holder tag; the winner writes its own as its run starts.
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in heartbeat_tags().items()])
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
