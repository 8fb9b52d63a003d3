"""Job states for submitit on SLURM clusters without accounting (no slurmdbd: sacct does not work).

submitit 1.5 learns a job's state only from `sacct`. Where accounting is off, every poll fails:
sacct prints "Slurm accounting storage is disabled" and submitit logs "Bypassing sacct error" (once per
poll, for the whole sweep), and a job that ends without writing its result file (cancelled with
scancel, killed by a time limit, its node lost) stays UNKNOWN: the launching command waits for it
forever. This watcher asks sacct once; where sacct does not work it says so in one line and reads
states from `squeue` instead, which knows every job the controller holds (finished ones for
MinJobAge, 300 s by default); a job the controller no longer knows has ended.
"""

from __future__ import annotations

import logging
import subprocess
import time

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

ENDED = "ENDED"  # the state of a job squeue no longer lists: not one of submitit's unfinished states


class SqueueFallbackWatcher(SlurmInfoWatcher):
    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self.sacct_works: bool | None = None  # decided at the first poll

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        if self.sacct_works is None:
            self.sacct_works = self._sacct_works(command)
        if self.sacct_works:
            super().update()
            return
        self._num_calls += 1
        main_ids = sorted({job_id.split("_")[0] for job_id in self._registered - self._finished})
        shown = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N",
                                f"--jobs={','.join(main_ids)}"], capture_output=True, text=True)
        # squeue fails for an id the controller has forgotten, and then lists nothing at all
        forgotten = shown.returncode != 0 and "Invalid job id" in shown.stderr
        if shown.returncode == 0 or forgotten:
            listed = self.read_info("JobID|State|NodeList\n" + shown.stdout) if shown.stdout.strip() else {}
            self._info_dict.update(listed)
            for job_id in self._registered - self._finished:
                if job_id not in listed:
                    self._info_dict[job_id] = {"JobID": job_id, "State": ENDED}
        else:
            log.debug("squeue failed (%s); job states not updated this time", shown.stderr.strip())
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _sacct_works(self, command: list[str]) -> bool:
        tried = subprocess.run(command, capture_output=True, text=True)
        if tried.returncode == 0:
            return True
        reason = (tried.stderr.strip().splitlines() or [f"exit code {tried.returncode}"])[0]
        log.warning("sacct does not work on this cluster (%s): job states come from squeue instead", reason)
        return False


def install() -> None:
    """Make submitit's SLURM jobs (in this process) use the watcher. Idempotent."""
    if not isinstance(SlurmJob.watcher, SqueueFallbackWatcher):
        SlurmJob.watcher = SqueueFallbackWatcher(delay_s=600)  # submitit's own delay for SLURM
