"""Photos -> an identity: every photo analysed (in the request's thread, never behind generation), then the
photos, aligned crops and embeddings written and the rows added, or nothing at all.

The analysis comes first and holds everything in memory, so a bad upload (empty, truncated, not an image,
a decompression bomb, no face) is refused before a byte is written or a row added.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import FaceIDError, ImageError, NoFaceError
from ..images import load_image
from .files import DataDir, new_id
from .store import Identity, IdentityFace, Store


class UploadTooLarge(FaceIDError):
    """An uploaded file is larger than the server takes."""


@dataclass
class AnalysedPhoto:
    image: Image.Image
    face: object  # faceid.faces.Face, the largest
    faces_found: int
    warnings: list[str] = field(default_factory=list)


def decode_upload(data: bytes, label: str, max_pixels: int, what: str = "the photo") -> Image.Image:
    """An uploaded file as ``load_image`` loads it (upright RGB; size checked from the header before decoding), or
    an ``ImageError`` that names the upload by ``label`` (load_image names bytes "<image bytes>": say ``what``)."""
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise ImageError(f"{label}: {re.sub(r'(Image (file )?)?<image bytes>', what, str(exc))}") from None


class SerialAnalyzer:
    """A face analyzer that runs one analysis at a time: OpenCV's detectors keep per-call state (the input size),
    and requests (enrollment) and workers (kps control images, swap targets) share one analyzer."""

    def __init__(self, analyzer) -> None:
        self.analyzer = analyzer
        self._lock = threading.Lock()
        # what scorers name the recognizer by (``faceid.scoring``: "arcface" for buffalo_l's)
        self.name = getattr(analyzer, "name", None)
        self.recognizer = getattr(analyzer, "recognizer", None)

    def analyze(self, image, *args, **kwargs):
        with self._lock:
            return self.analyzer.analyze(image, *args, **kwargs)


class Enroller:
    def __init__(self, analyzer, data: DataDir, store: Store, max_pixels: int, small_face: int) -> None:
        self.analyzer = analyzer if isinstance(analyzer, SerialAnalyzer) else SerialAnalyzer(analyzer)
        self.data = data
        self.store = store
        self.max_pixels = max_pixels
        self.small_face = small_face

    def analyse(self, data: bytes, label: str) -> AnalysedPhoto:
        image = decode_upload(data, label, self.max_pixels)
        faces = self.analyzer.analyze(np.asarray(image))
        if not faces:
            raise NoFaceError(
                f"{label}: no face found. Use a clear, front-facing photo where the face is at least ~64 px wide, "
                "or crop the photo around the face."
            )
        face = faces[0]  # largest first
        warnings = []
        if len(faces) > 1:
            warnings.append(f"{label}: {len(faces)} faces found; the largest is used (upload a photo of one person)")
        width = float(face.box[2] - face.box[0])
        if width < self.small_face:
            warnings.append(
                f"{label}: the face is small ({width:.0f} px wide); a photo where it is at least "
                f"{self.small_face} px wide gives a better likeness"
            )
        return AnalysedPhoto(image, face, len(faces), warnings)

    def create(self, owner: str, name: str | None, photos: list[AnalysedPhoto]) -> Identity:
        """Write the identity's files, then its rows; on any failure, remove what was written."""
        identity_id = new_id()
        identity = Identity(id=identity_id, owner=owner, name=name, created=time.time())
        try:
            self.data.identity_dir(identity_id).mkdir(parents=True)
            for k, photo in enumerate(photos):
                photo.image.save(self.data.photo(identity_id, k), format="PNG")
                Image.fromarray(photo.face.aligned).save(self.data.crop(identity_id, k), format="PNG")
                self.data.save_face(identity_id, k, photo.face)
                identity.faces.append(
                    IdentityFace(
                        owner=owner,
                        k=k,
                        box=[round(float(v), 2) for v in photo.face.box],
                        score=float(photo.face.score),
                        faces_found=photo.faces_found,
                        recognizers=sorted(photo.face.embeddings) or ["buffalo_l"],
                    )
                )
            self.store.add_identity(identity)
        except BaseException:
            self.data.remove_identity(identity_id)
            raise
        return self.store.identity(identity_id, owner)

    def delete(self, identity_id: str, owner: str) -> bool:
        """Rows and files: the photos, crops and embeddings are gone from disk and database."""
        if not self.store.delete_identity(identity_id, owner):
            return False
        self.data.remove_identity(identity_id)
        return True

    def faces(self, identity: Identity) -> list:
        """The ``Face`` of every photo of an identity, as generation takes them."""
        return [self.data.load_face(identity.id, row.k) for row in identity.faces]
