"""Writing files so that a reader (or a crash) never sees half of one.

Every file faceid writes for later use (images, adapters, LoRAs, dataset shards and manifests,
evaluation results, downloaded face models) goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; renamed over ``path`` when the block succeeds.

    The block writes the temporary file by name (any writer: ``save_file``, ``Image.save``, ``open``).
    Then the file's data are flushed to disk (``fsync``) and it is renamed: the rename is atomic (same
    folder, same file system), so readers see the old file or the whole new one, also after a crash or a
    power loss. When the block fails, the temporary file is removed. Its name, ``.<name>.tmp-<pid>-<thread>``,
    is unique per writer, so threads writing side by side do not collide.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` through :func:`atomic_path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _fsync(path: Path) -> None:
    """Flush a written file's data to disk (whoever wrote it has closed it; fsync works per file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
