"""The job queue: bounded, in submission order, handing workers batches of compatible jobs; and each job's
events (what ``GET /v1/generations/{id}/events`` streams).

The database holds every job (a restart finds them again); this is the in-memory side: who is waiting,
who runs, their progress and their events.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..settings import GenerationSettings

KEEP_FINISHED = 1000  # finished jobs whose events stay in memory (older ones are answered from the database)
# A worker takes jobs for the models it has loaded before older jobs that need a load (a load costs seconds to
# minutes, a batch seconds: serving what is loaded first keeps the throughput), but the oldest job is passed
# over at most this many times; then it runs next, loading its models. Counted in batches, not seconds, so
# that a busy model cannot starve the others however long its batches take.
PASS_OVER_LIMIT = 4


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class EventLog:
    """The events of one job, numbered from 1; readers poll ``since(n)`` for those after the n-th. ``closed`` after
    the last event.

    Every event is kept (a late subscriber gets them all), except the ``latest_only`` kinds (previews): there a new
    event replaces the one before it, and the last event drops it. A reader that was still behind never needs an
    old preview (the newer one shows more), and a finished job's images replace its previews; so a job's previews
    hold one preview's memory while it runs and none after, however many steps it has and however long the
    finished job stays in memory (``KEEP_FINISHED``), while late subscribers still get every other event and the
    newest preview."""

    def __init__(self, latest_only: tuple[str, ...] = ("preview",)) -> None:
        self._items: list[tuple[int, str, dict]] = []  # (number, kind, data), in order
        self._count = 0
        self._latest_only = latest_only
        self._lock = threading.Lock()
        self.closed = False
        self.finished = threading.Event()  # set with the last event: for callers that wait for the end

    def add(self, kind: str, data: dict[str, Any], last: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            drop = self._latest_only if last else (kind,) if kind in self._latest_only else ()
            if drop:
                self._items = [item for item in self._items if item[1] not in drop]
            self._count += 1
            self._items.append((self._count, kind, data))
            self.closed = last
        if last:
            self.finished.set()

    def since(self, number: int) -> tuple[list[tuple[str, dict]], int, bool]:
        """The events after the ``number``-th (0: all kept), the number of the last one, and ``closed``."""
        with self._lock:
            items = [(kind, data) for n, kind, data in self._items if n > number]
            return items, self._count, self.closed


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
    step: int = 0
    total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    events: EventLog = field(default_factory=EventLog)

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
    def __init__(self, max_queue: int, workers: int = 1) -> None:
        self.max_queue = max_queue
        self.workers = workers
        self._cond = threading.Condition()
        self._queued: list[QueuedJob] = []
        self._running: dict[str, QueuedJob] = {}
        self._jobs: OrderedDict[str, QueuedJob] = OrderedDict()  # every job this process knows
        self._stopped = False
        self.paused = False
        self.mean_job_seconds = 10.0  # updated by the workers; for Retry-After

    # ------------------------------------------------------------------ producers
    def put(self, job: QueuedJob, force: bool = False) -> int:
        """Queue ``job``; its position (0 = next). Refused with ``QueueFull`` when full, unless ``force``
        (a restart re-queues every unfinished job whatever the bound)."""
        with self._cond:
            if not force and len(self._queued) >= self.max_queue:
                waiting = len(self._queued) + len(self._running)
                raise QueueFull(max(1, round(self.mean_job_seconds * waiting / max(1, self.workers))))
            self._queued.append(job)
            self._remember(job)
            self._cond.notify_all()
            return len(self._queued) - 1

    def _remember(self, job: QueuedJob) -> None:
        self._jobs[job.id] = job
        finished = [k for k, j in self._jobs.items() if j.status not in ("queued", "running")]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[key]

    def get(self, job_id: str) -> QueuedJob | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        with self._cond:
            for i, job in enumerate(self._queued):
                if job.id == job_id:
                    return i
            return None

    def cancel(self, job_id: str) -> str | None:
        """``"queued"``: taken out of the queue at once; ``"running"``: it stops at its next step; None: neither."""
        with self._cond:
            for job in self._queued:
                if job.id == job_id:
                    self._queued.remove(job)
                    job.cancel.set()
                    return "queued"
            job = self._running.get(job_id)
            if job is not None:
                job.cancel.set()
                return "running"
            return None

    # ------------------------------------------------------------------ workers
    def take(
        self, max_images: int, timeout: float = 0.5, ready: Callable[[QueuedJob], bool] | None = None
    ) -> list[QueuedJob]:
        """The next job and the queued jobs after it that share its batch key, up to ``max_images`` images in
        all (a job is never split; the first one runs even if alone it has more). Empty after ``timeout``.

        ``ready(job)``: whether the caller can run ``job`` without loading models. The next job is then the
        oldest ready one, unless the oldest job was passed over ``PASS_OVER_LIMIT`` times already."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._stopped or (self._queued and not self.paused), timeout):
                return []
            if self._stopped:
                return []
            first = self._queued[0]
            if ready is not None and first.passed_over < PASS_OVER_LIMIT and not ready(first):
                found = next((job for job in self._queued if ready(job)), None)
                if found is not None:
                    for job in self._queued[: self._queued.index(found)]:
                        job.passed_over += 1
                    first = found
            batch, images = [first], first.images
            for job in self._queued:
                if job is first:
                    continue
                if job.batch_key == first.batch_key and images + job.images <= max_images:
                    batch.append(job)
                    images += job.images
            for job in batch:
                self._queued.remove(job)
                self._running[job.id] = job
                job.status = "running"
            return batch

    def done(self, job: QueuedJob) -> None:
        with self._cond:
            self._running.pop(job.id, None)
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
        with self._cond:
            return sum(job.owner == owner for job in self._queued)

    @property
    def depth(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._running)
