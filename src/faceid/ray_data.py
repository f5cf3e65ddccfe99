"""Batch work on Ray Data (``faceid prepare --ray``, ``faceid eval --ray``): a Ray instance joined or started, and
a pool of actors, each loading its models once, mapping a function over work items.

The Ray Data pipeline carries each work item pickled in a binary column with its index (``ray.data.from_items``:
no read tasks to compete with the actors for CPUs; a block per batch, so that results stream back batch by batch)
and, back, each item's result pickled the same way, so any picklable item or result (a dataclass with numpy
arrays) arrives as it left, without a schema to keep in step. An actor sees only its own batches. Results come
back as they finish, not in order: the caller puts them in place by index.

Nothing here knows about faces or images; :mod:`faceid.data.prepare` and :mod:`faceid.evaluation.run` give it
what to load (``setup``) and what to do with a batch (``work``), module-level functions (or ``functools.partial``
of them) so that they pickle by reference to the code every worker imports.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FaceIDError

__all__ = ["RayWorkers", "map_on_actors", "ray_session"]


@dataclass(frozen=True)
class RayWorkers:
    """Where and on how many actors batch work runs.

    ``address``: ``None`` uses the Ray instance this process already joined (``ray.init`` before), else starts a
    local one; ``"auto"`` joins the cluster this machine belongs to, ``"ray://HOST:PORT"`` a remote one (every
    worker must see the same paths: inputs, outputs and models live on a shared filesystem). ``workers``: actors
    (each holds its own copy of the models). ``gpus_per_worker``: ``None`` gives each actor one GPU when the
    cluster has GPUs, none otherwise. ``batch_size``: items per call of an actor; ``None`` lets each command pick
    one for the device (more on a GPU). ``cpus_per_worker``: CPUs Ray reserves for each actor (and the threads torch
    and onnxruntime use there: Ray sets ``OMP_NUM_THREADS`` to it).
    """

    address: str | None = None
    workers: int = 2
    gpus_per_worker: float | None = None
    batch_size: int | None = None
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


class _Actor:
    """One worker of the pool: ``setup()`` once (models loaded), then ``work(state, items)`` per batch."""

    def __init__(self, setup: Callable[[], Any], work: Callable[[Any, list], list]) -> None:
        self.state = setup()
        self.work = work

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        indices = [int(i) for i in batch["index"]]
        try:
            results = self.work(self.state, [pickle.loads(blob) for blob in batch["item"]])
            if len(results) != len(indices):
                raise RuntimeError(f"a batch of {len(indices)} item(s) gave {len(results)} result(s)")
            blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in results]
        except Exception as exc:  # noqa: BLE001 - sent back as it is: Ray Data would rewrite its message
            blobs = [_failure(exc)] * len(indices)
        pickled = np.empty(len(blobs), dtype=object)
        pickled[:] = blobs
        return {"index": np.asarray(indices, np.int64), "result": pickled}


class _Failed:
    """An item's work raised ``error``: the caller raises it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _failure(exc: Exception) -> bytes:
    try:
        return pickle.dumps(_Failed(exc))
    except Exception:  # noqa: BLE001 - an error that does not pickle: its type and message
        return pickle.dumps(_Failed(RuntimeError(f"{type(exc).__name__}: {exc}")))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray joined (or a local instance started) for the whole block, so that a command's several pipelines
    share one instance; left (shut down) at the end when this started it."""
    started = _join(address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def _join(address: str | None) -> bool:
    """Join (or start) Ray; True when this call started it (the caller shuts it down)."""
    try:
        import ray
    except ImportError as exc:
        raise FaceIDError("--ray needs Ray Data: pip install 'faceid[cluster]'") from exc
    if ray.is_initialized():
        return False
    ray.init(address=address or None, log_to_driver=False)
    return True


def map_on_actors(
    items: Sequence[Any],
    setup: Callable[[], Any],
    work: Callable[[Any, list], list],
    workers: RayWorkers,
    *,
    batch_size: tuple[int, int] = (8, 32),
) -> Iterator[tuple[int, Any]]:
    """``work(state, batch)`` over ``items`` on ``workers.workers`` actors, each running ``setup()`` once for its
    ``state``; yields ``(index, result)`` per item as batches finish (any order). ``batch_size``: items per call
    on a CPU and on a GPU actor, when ``workers.batch_size`` leaves it open.

    Ray is joined (or started) on first use and, when this call started it, shut down when the iteration ends.
    An error in an actor stops the iteration with that error (raised here as itself).
    """
    if not items:
        return
    started = _join(workers.address)
    import ray
    import ray.data

    try:
        gpus = workers.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        size = workers.batch_size or batch_size[1 if gpus else 0]
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the commands show their own progress (tqdm, log lines)
        # Blocks of whole batches, so that every actor gets some (no repartition: its tasks would wait for the
        # CPUs the actors hold).
        blocks = max(1, -(-len(items) // size))
        rows = [
            {"index": i, "item": pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)} for i, item in enumerate(items)
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
        del rows
        mapped = dataset.map_batches(
            _Actor,
            fn_constructor_args=(setup, work),
            batch_size=size,
            batch_format="numpy",
            # Up to `workers` actors, all asked for at once; the work starts with the first one ready, so more
            # workers than the cluster holds (GPUs, CPUs) wait for room instead of stalling the pipeline.
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers.workers, initial_size=workers.workers),
            num_cpus=workers.cpus_per_worker,
            num_gpus=gpus,
        )
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            for index, blob in zip(batch["index"], batch["result"], strict=True):
                result = pickle.loads(blob)
                if isinstance(result, _Failed):  # the actor's own error (a FaceIDError says what to do)
                    raise result.error
                yield int(index), result
    finally:
        if started:
            ray.shutdown()
