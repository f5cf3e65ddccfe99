"""The job queue: bounded, in submission order, handing workers batches of compatible jobs.

It lives in the database (``store.Job`` rows, their events in ``store.JobEvent``), so every process that opens
the database (ingress replicas, model replicas, a restarted server) sees the same queue, progress and events:
a job is claimed atomically by one worker, cancelled by a flag its worker reads at each step.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import FaceIDError
from ..settings import GenerationSettings
from .store import Job, Store

POLL_SECONDS = 0.2  # an idle worker looks for jobs submitted by other processes this often
# A worker takes jobs for the models it has loaded before older jobs that need a load (a load costs seconds to
# minutes, a batch seconds: serving what is loaded first keeps the throughput), but the oldest job is passed
# over at most this many times; then it runs next, loading its models. Counted in batches, not seconds, so
# that a busy model cannot starve the others however long its batches take.
PASS_OVER_LIMIT = 4


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


@dataclass(eq=False)
class QueuedJob:
    id: str
    owner: str
    settings: GenerationSettings  # resolved, one seed per image
    identity_ids: list[str]  # one per prompt; with ``inputs["people"]``, those people (of every picture)
    created_ns: int
    entry: Any = None  # the catalog entry (``faceid.service.models.ModelEntry``) it runs on
    inputs: dict[str, Any] = field(default_factory=dict)  # its input images by upload id (JobInputs JSON; {}: none)
    status: str = "queued"
    passed_over: int = 0  # times a worker took a later job first (see PASS_OVER_LIMIT)

    @property
    def prompts(self) -> list[str]:
        prompt = self.settings.prompt
        return [prompt] if isinstance(prompt, str) else list(prompt)

    @property
    def negative_prompts(self) -> list[str]:
        negative = self.settings.negative_prompt
        negatives = [negative] if isinstance(negative, str) else list(negative)
        return negatives * len(self.prompts) if len(negatives) == 1 else negatives

    @property
    def images(self) -> int:
        return len(self.prompts) * self.settings.num_images_per_prompt

    @property
    def batch_key(self) -> str:
        """Jobs with the same key can share one UNet batch: everything but prompts and seeds is the same, the inputs
        too (the same uploads, control kinds, scales and windows give every job the images it gets alone; the same
        people and regions, since a call places the same people in every picture; the same style references). A
        swap runs alone: each of its images is a pipeline call of its own, on a crop of its own target."""
        settings = self.settings.model_dump_json(exclude={"prompt", "negative_prompt", "seed"})
        alone = {"swap job": self.id} if "swap" in self.inputs else {}
        return settings + json.dumps({**self.inputs, **alone}, sort_keys=True)


class JobQueue:
    """The queue, in the database (``Store``): a job is queued by inserting its row (counted under the queue's
    lock: ``max_queue`` and the key quotas hold across processes) and claimed by a worker of any process
    (``Store.claim``), so several ingress processes and model replicas share one queue. Workers of this process
    are woken at once by a submission here, and poll for the others' (``POLL_SECONDS``)."""

    def __init__(self, store: Store, max_queue: int, workers: int = 1) -> None:
        self.store = store
        self.max_queue = max_queue
        self.workers = workers
        self._cond = threading.Condition()
        self._stopped = False
        self.paused = False  # this process's workers take nothing (``ServeConfig.start_workers``)
        self.mean_job_seconds = 10.0  # updated by the workers; for Retry-After

    # ------------------------------------------------------------------ producers
    def put(self, row: Job, check: Callable[[int, int, int], None] | None = None) -> int:
        """Queue the job of ``row``; its position (0 = next). Refused with ``QueueFull`` when full, after
        ``check(queued, running, queued_of_owner)`` (the key's quotas), all under the queue's lock."""

        def within_bounds(queued: int, running: int, mine: int) -> None:
            if queued >= self.max_queue:
                raise QueueFull(self.retry_after(queued + running))
            if check is not None:
                check(queued, running, mine)

        position = self.store.add_queued_job(row, within_bounds)
        with self._cond:
            self._cond.notify_all()
        return position

    def retry_after(self, waiting: int) -> int:
        return max(1, round(self.mean_job_seconds * waiting / max(1, self.workers)))

    def position(self, row: Job) -> int:
        return self.store.position(row)

    def cancel(self, job_id: str) -> str | None:
        """``"queued"``: cancelled at once (taken out of the queue); ``"running"``: its worker, in whichever process,
        stops it at its next step; None: neither."""
        return self.store.request_cancel(job_id)

    # ------------------------------------------------------------------ workers
    def take(
        self,
        worker: str,
        max_images: int,
        make: Callable[[Job], QueuedJob],
        timeout: float = 0.5,
        ready: Callable[[QueuedJob], bool] | None = None,
    ) -> list[QueuedJob]:
        """Claim the next job and the queued jobs after it that share its batch key, up to ``max_images`` images in
        all (a job is never split; the first one runs even if alone it has more), for ``worker``. Empty after
        ``timeout``. ``make(row)``: the row as a ``QueuedJob`` (a row that cannot be read fails, saying why).

        ``ready(job)``: whether the caller can run ``job`` without loading models. The next job is then the
        oldest ready one, unless the oldest job was passed over ``PASS_OVER_LIMIT`` times already."""
        deadline = time.monotonic() + timeout
        while True:
            if self._stopped:
                return []
            batch = (
                []
                if self.paused
                else self.store.claim(worker, lambda rows: self._choose(rows, max_images, make, ready))
            )
            if batch:
                return [make(row) for row in batch]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            with self._cond:
                self._cond.wait(min(left, POLL_SECONDS))

    @staticmethod
    def _choose(rows: list[Job], max_images: int, make, ready) -> tuple[list[Job], list[Job], list[tuple[Job, str]]]:
        jobs, failed = [], []
        for row in rows:
            try:
                jobs.append((row, make(row)))
            except Exception as exc:  # its models are no longer served, or its record no longer reads
                error = str(exc) if isinstance(exc, FaceIDError) else f"its stored record cannot be read ({exc})"
                failed.append((row, error))
        if not jobs:
            return [], [], failed
        first_row, first = jobs[0]
        passed: list[Job] = []
        if ready is not None and (first_row.passed_over or 0) < PASS_OVER_LIMIT and not ready(first):
            found = next((k for k, (_, job) in enumerate(jobs) if ready(job)), None)
            if found is not None:
                passed = [row for row, _ in jobs[:found]]
                first_row, first = jobs[found]
        # the stored key (what the job was submitted with) and the row's as read now: a row changed since runs alone
        key = (first_row.batch_key, first.batch_key)
        batch, images = [first_row], first.images
        for row, job in jobs:
            if row is first_row or key[0] is None or (row.batch_key, job.batch_key) != key:
                continue
            if images + job.images <= max_images:
                batch.append(row)
                images += job.images
        return batch, passed, failed

    def done(self, job: QueuedJob) -> None:
        """``job`` ended here (nothing to do: its row says so); wakes this process's workers."""
        with self._cond:
            self._cond.notify_all()

    def record_seconds(self, seconds: float) -> None:
        self.mean_job_seconds = 0.8 * self.mean_job_seconds + 0.2 * seconds

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def queued_of(self, owner: str) -> int:
        """How many of ``owner``'s jobs wait in the queue (running ones not counted, as ``max_queue`` counts)."""
        return self.store.queue_counts(owner)[0]

    @property
    def depth(self) -> int:
        return self.store.queue_counts()[0]

    @property
    def running(self) -> int:
        return self.store.queue_counts()[1]
