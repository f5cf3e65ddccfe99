"""The data dir: where identities' photos, crops and embeddings and the generated images live.

Every path is built from ids the server made (``new_id``: 32 hex digits), never from a request's file
names or other values, and every path is checked to resolve inside the data dir before it is used.

```
DATA/
  faceid.db                        the database (SQLite, unless --database-url)
  identities/<identity>/           one folder per identity: deleting it deletes its biometric data
    photo_<k>.png                  the photo as analysed (decoded, upright, no metadata)
    crop_<k>.png                   the aligned 112x112 face
    face_<k>.npz                   embedding, landmarks, box, aligned crops, photo size, and the embedding of
                                   each recognizer (insightface pack) it was analysed with (what generation needs)
  images/<image>.png               generated images, with their settings in the PNG text chunks
```
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import FaceIDError

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
FILE_PATTERN = re.compile(
    r"^((photo|crop|face)_\d{1,4}\.(png|npz)|[0-9a-f]{32}(-control\d{1,2})?\.png|[0-9a-f]{32}-step\d{1,6}\.json)$"
)
FOLDERS = ("identities", "images", "uploads", "previews")


def new_id() -> str:
    return uuid.uuid4().hex


def is_id(value: str) -> bool:
    return bool(ID_PATTERN.fullmatch(value))


class DataDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        for sub in FOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _inside(self, *parts: str) -> Path:
        for part in parts:
            if not (is_id(part) or FILE_PATTERN.fullmatch(part) or part in FOLDERS):
                raise FaceIDError(f"not a server-made path component: {part!r}")
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise FaceIDError(f"{path} is outside the data dir {self.root}")
        return path

    # ------------------------------------------------------------------ identities
    def identity_dir(self, identity_id: str) -> Path:
        return self._inside("identities", identity_id)

    def photo(self, identity_id: str, k: int) -> Path:
        return self._inside("identities", identity_id, f"photo_{int(k)}.png")

    def crop(self, identity_id: str, k: int) -> Path:
        return self._inside("identities", identity_id, f"crop_{int(k)}.png")

    def face(self, identity_id: str, k: int) -> Path:
        return self._inside("identities", identity_id, f"face_{int(k)}.npz")

    def remove_identity(self, identity_id: str) -> None:
        folder = self.identity_dir(identity_id)
        if folder.exists():
            shutil.rmtree(folder)

    def save_face(self, identity_id: str, k: int, face) -> None:
        """The face's arrays; with the embedding of every recognizer the analysis ran (``Face.embeddings`` and
        ``raw_embeddings`` by pack, as ``embedding.<pack>`` / ``raw_embedding.<pack>``) and the photo's size, so
        that a method which reads another pack's embedding (InstantID: antelopev2's raw vector), the keypoints
        in their frame or the FFHQ-aligned crop (PuLID) runs without analysing the photo again."""
        from ..atomic import atomic_path

        packs = {f"embedding.{pack}": np.asarray(v, np.float32) for pack, v in face.embeddings.items()}
        packs.update({f"raw_embedding.{pack}": np.asarray(v, np.float32) for pack, v in face.raw_embeddings.items()})
        size = {} if face.image_size is None else {"image_size": np.asarray(face.image_size, np.int64)}
        crop_ffhq = {} if face.crop_ffhq is None else {"crop_ffhq": np.asarray(face.crop_ffhq, np.uint8)}
        with atomic_path(self.face(identity_id, k)) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                box=np.asarray(face.box, np.float32),
                score=np.float32(face.score),
                landmarks=np.asarray(face.landmarks, np.float32),
                embedding=np.asarray(face.embedding, np.float32),
                aligned=np.asarray(face.aligned, np.uint8),
                crop_224=np.asarray(face.crop_224, np.uint8),
                **size,
                **crop_ffhq,  # PuLID's crop (a face analysed with antelopev2)
                **packs,
            )

    def load_face(self, identity_id: str, k: int):
        """The ``Face`` ``save_face`` stored; a file of an earlier version (no packs, no photo size) reads as
        before: its ``embedding`` only, which is buffalo_l's."""
        from ..faces import Face

        with np.load(self.face(identity_id, k)) as data:

            def by_pack(prefix: str) -> dict[str, np.ndarray]:
                return {name.removeprefix(prefix): data[name] for name in data.files if name.startswith(prefix)}

            size = tuple(int(v) for v in data["image_size"]) if "image_size" in data.files else None
            return Face(
                box=data["box"],
                score=float(data["score"]),
                landmarks=data["landmarks"],
                embedding=data["embedding"],
                aligned=data["aligned"],
                crop_224=data["crop_224"],
                embeddings=by_pack("embedding."),
                raw_embeddings=by_pack("raw_embedding."),
                image_size=size,
                crop_ffhq=data["crop_ffhq"] if "crop_ffhq" in data.files else None,
            )

    # ------------------------------------------------------------------ images
    def image(self, image_id: str) -> Path:
        return self._inside("images", f"{image_id}.png")

    def control_image(self, job_id: str, k: int) -> Path:
        return self._inside("images", f"{job_id}-control{int(k)}.png")

    def preview(self, job_id: str, step: int) -> Path:
        """A running job's newest preview event (its images as data URLs, JSON): any process serving its events reads
        it; replaced by the next one, deleted when the job ends."""
        return self._inside("previews", f"{job_id}-step{int(step)}.json")

    def previews_of(self, job_id: str) -> list[Path]:
        return sorted(self._inside("previews").glob(f"{job_id}-step*.json"))

    # ------------------------------------------------------------------ uploads
    def upload(self, upload_id: str) -> Path:
        return self._inside("uploads", f"{upload_id}.png")
