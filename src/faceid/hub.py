"""Fetching the released weights: pinned to a Hub commit, checked against their sha256, with clear errors.

A released file is a :class:`HubFile` (a model folder, a :class:`HubFolder`): its repository, the commit it
is pinned to and the sha256 it must have; the tables of faceid's modules list them (``faceid.variants``,
``faceid.references``, ``faceid.fast`` ...). :func:`fetch` downloads one at its pinned commit. A downloaded
file whose sha256 is not the table's is refused. A file released outside the Hub (a GitHub release asset, pinned
by its tagged address and sha256) is a :class:`ReleaseAsset`, fetched by :func:`fetch_asset` into faceid's models
folder, checked the same way. The hash of a file is remembered (``$FACEID_HOME/sha256.json``, keyed by the file's
real path, size and modification time) so that a 1 GB file is hashed once, not on every start.
Anything that is a local file or folder is used as it is; nothing is downloaded or checked then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path
from .errors import CheckpointError, MissingWeightsError

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (repo, file) already warned about as not pinned: once per process


@dataclass(frozen=True)
class HubFile:
    """One released file: where it is, at which commit, and what it must hash to (None: not known)."""

    repo: str
    filename: str
    revision: str | None  # a commit id; None: the repository's current main (not pinned)
    sha256: str | None  # the Git LFS oid; None: not hash-pinned
    size: int | None = None  # bytes, from the same LFS pointer
    subfolder: str | None = None

    @property
    def path_in_repo(self) -> str:
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename


@dataclass(frozen=True)
class HubFolder:
    """A model folder in a Hub repository (transformers layout), pinned to a commit."""

    repo: str
    subfolder: str | None
    revision: str | None

    def __str__(self) -> str:
        return f"{self.repo}/{self.subfolder}" if self.subfolder else self.repo


@dataclass(frozen=True)
class ReleaseAsset:
    """One file released outside the Hub (a GitHub release asset): its address (a tag's, which does not move), the
    sha256 it must have, its size where known."""

    url: str
    sha256: str
    size: int | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def fetch(file: HubFile) -> Path:
    """A released file from the Hub at its pinned commit, refused unless its sha256 is the table's."""
    path = download(file.repo, file.filename, file.subfolder, revision=file.revision)
    verify(path, file)
    return path


def download(repo_id: str, filename: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Fetch one file from the Hub (with huggingface_hub's progress bar), or say how to get it by hand."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, local_files_only=offline())
        )
    except Exception as exc:  # offline, no such file, gated repo, network error: the remedy is the same
        where = f"{subfolder}/{filename}" if subfolder else filename
        at = f" at commit {revision}" if revision else ""
        raise MissingWeightsError(
            f"could not get {where}{at} from the Hugging Face Hub repo {repo_id} ({type(exc).__name__}). "
            f"Download it on a machine with internet (https://huggingface.co/{repo_id}/blob/{revision or 'main'}/"
            f"{where}) and pass the local file path instead of the name"
        ) from exc


def download_url(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` with a progress bar (tqdm)."""
    import urllib.request

    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def fetch_asset(asset: ReleaseAsset, folder: str | os.PathLike | None = None) -> Path:
    """``asset`` in ``folder`` (default ``$FACEID_HOME/models/assets``): the copy there when its sha256 is the
    release's, else downloaded (offline: refused, saying where to get it), checked, and only then put in place."""
    target = (Path(folder).expanduser() if folder is not None else faceid_home() / "models" / "assets") / asset.filename
    if target.is_file() and file_sha256(target) == asset.sha256:
        return target
    how = f"download {asset.url} (sha256 {asset.sha256}) into {target.parent}, or give its folder"
    if offline():
        raise MissingWeightsError(f"{asset.filename} is not in {target.parent} and HF_HUB_OFFLINE is set: {how}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            download_url(asset.url, tmp)
            found = file_sha256(tmp)
            if found != asset.sha256:
                raise CheckpointError(
                    f"{asset.filename} downloaded from {asset.url} is not the released file: its sha256 is {found} "
                    f"({tmp.stat().st_size} bytes), the release's is {asset.sha256}; nothing was kept. Run again, "
                    f"or {how}"
                )
    except OSError as exc:  # no network, moved address, full disk: the remedy is the same
        raise MissingWeightsError(f"could not download {asset.url} ({type(exc).__name__}: {exc}): {how}") from exc
    return target


def verify(path: str | os.PathLike, file: HubFile) -> None:
    """Refuse ``path`` unless it hashes to ``file.sha256``; warn once when the table has no hash for it."""
    first = (file.repo, file.path_in_repo) not in _warned
    _warned.add((file.repo, file.path_in_repo))
    if first and file.revision is None:
        logger.warning(
            "%s is not pinned to a commit of %s: the repository's current main is used", file.filename, file.repo
        )
    if file.sha256 is None:
        if first:
            logger.warning(
                "%s (%s) is not hash-pinned in faceid's variant table: it is used without checking its sha256",
                file.filename,
                file.repo,
            )
        return
    found = file_sha256(path)
    if found == file.sha256:
        return
    size = Path(path).stat().st_size
    real = Path(path).resolve()
    where = f"{real} (and the link {path} to it)" if Path(path).is_symlink() else str(real)
    sizes = f" ({size} bytes; the release has {file.size})" if file.size is not None and size != file.size else ""
    raise CheckpointError(
        f"{file.filename} from {file.repo} (commit {file.revision or 'main'}) is not the released file: its sha256 "
        f"is {found}{sizes}, the release's is {file.sha256}. The download is incomplete or corrupted, or the "
        f"cached copy was changed: delete {where} and run again to download it afresh. If a "
        f"fresh download still differs, report it (https://huggingface.co/{file.repo}/discussions) and use a "
        "copy you trust by its path meanwhile"
    )


# ---------------------------------------------------------------------------------------------- hashes
def faceid_home() -> Path:
    """``$FACEID_HOME`` (default ``~/.cache/faceid``): faceid's own cache (models, remembered hashes)."""
    home = os.environ.get("FACEID_HOME")
    return Path(home).expanduser() if home else Path("~/.cache/faceid").expanduser()


def _hash_cache() -> Path:
    return faceid_home() / "sha256.json"


def _stamp(path: str) -> list[int] | None:
    """What a remembered hash depends on: the file's size and modification time (None: file gone)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_hash_cache() -> dict:
    try:
        cache = json.loads(_hash_cache().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of ``path``, remembered per (real path, size, mtime): a file that changes is hashed again,
    and entries of files that changed or are gone are dropped whenever one is added."""
    real = str(Path(path).resolve())
    stamp = _stamp(real)
    if stamp is None:
        raise CheckpointError(f"{path}: file not found")
    cache = _read_hash_cache()
    entry = cache.get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    found = digest.hexdigest()
    if _stamp(real) != stamp:  # changed while being read: do not remember a hash of a moving target
        return found
    fresh = {k: e for k, e in cache.items() if isinstance(e, dict) and _stamp(k) == e.get("stamp")}
    fresh[real] = {"stamp": stamp, "sha256": found}
    cache_file = _hash_cache()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(fresh, indent=1, sort_keys=True))
    except OSError as exc:  # a read-only home only costs hashing again next time
        logger.debug("could not remember the hash of %s: %s", real, exc)
    return found


def model_not_found(model: str, exc: Exception) -> MissingWeightsError:
    """The error for a base model (or image encoder) that is neither on disk nor downloadable."""
    return MissingWeightsError(
        f"could not load model {model!r}: it is not a local folder or file, and fetching it from the Hugging "
        f"Face Hub failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). On a machine with internet "
        f"run `huggingface-cli download {model} --local-dir DIR` (or save it with diffusers' save_pretrained) "
        "and pass DIR instead"
    )
