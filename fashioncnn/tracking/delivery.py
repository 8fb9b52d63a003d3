"""A run's metrics and tags on their way to the store: queued here, delivered in order by one thread.

MLflow's own asynchronous logging (`synchronous=False`, MLflow 3.17) does not fit an outage: its queue
has no bound, a pool of up to 10 threads sends batches in any order, and a batch that fails after the
HTTP client's retries is logged as an error and dropped (the exception reaches only a caller waiting on
that batch). Here a bounded queue feeds one thread that sends each batch with `log_batch` and, while the
store does not answer, retries the same batch every `tracking.retry_seconds`: nothing is dropped or
reordered, and training waits only when `tracking.max_queued` batches are waiting. A batch's metrics
carry the time they were measured, so a retry after an answer that was lost re-sends the same metric,
which the store keeps once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fashioncnn.tracking.secrets import mask_secrets

log = logging.getLogger(__name__)

_Batch = tuple[list[Metric], list[Param], list[RunTag]]


class Delivery:
    """Ordered, retried delivery of one run's metrics, params and tags; `drain` waits for all of it."""

    def __init__(self, client: MlflowClient, run_id: str, max_queued: int, retry_seconds: float) -> None:
        self.client, self.run_id, self.retry_seconds = client, run_id, retry_seconds
        self._queue: queue.Queue[_Batch | None] = queue.Queue(maxsize=max_queued)
        self.down_since: float | None = None
        self._thread = threading.Thread(target=self._deliver, name="mlflow-delivery", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float] | None = None, step: int = 0, params: Mapping[str, str] | None = None,
            tags: Mapping[str, str] | None = None) -> None:
        """Queue one batch; returns at once unless the queue is full."""
        now = int(time.time() * 1000)
        self._queue.put(([Metric(key, float(value), now, step) for key, value in (metrics or {}).items()],
                         [Param(key, str(value)) for key, value in (params or {}).items()],
                         [RunTag(key, str(value)) for key, value in (tags or {}).items()]))

    def _deliver(self) -> None:
        while (batch := self._queue.get()) is not None:
            while True:
                try:
                    self.client.log_batch(self.run_id, metrics=batch[0], params=batch[1], tags=batch[2])
                    break
                except Exception as error:
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        reason = mask_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)
                        log.warning("tracking store not answering (%s): training goes on, metrics wait here "
                                    "(%d batches queued) and are retried every %g s", reason, self._queue.qsize() + 1,
                                    self.retry_seconds)
                    time.sleep(self.retry_seconds)
            if self.down_since is not None:
                log.warning("tracking store answers again after %.0f s: queued metrics delivered in order",
                            time.monotonic() - self.down_since)
                self.down_since = None
            self._queue.task_done()
        self._queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is delivered; False when the store stayed away for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        """Stop the delivery thread (after `drain`); what is still queued is given up."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
