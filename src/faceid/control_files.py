"""``ControlFile``: a ControlNet's input given as a file (``faceid generate --control KIND:IMAGE[:SCALE]``): the
control kind, the image file it is made from and its conditioning scale; made into the control image the
ControlNet reads (``faceid.control.make_control_image``), and recorded by the file's name and sha256."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .control import KINDS, make_control_image
from .errors import FaceIDError
from .images import load_image
from .results import file_record, source_record


@dataclass(frozen=True)
class ControlFile:
    """A control image of ``kind`` (``faceid.control.KINDS``) made from the file ``image`` (for ``"image"``:
    the file is the control image), read at conditioning ``scale``."""

    kind: str
    image: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaceIDError(f"control kind {self.kind!r}: give one of {', '.join(KINDS)}")

    def make(self, analyzer: Any = None, size: tuple[int, int] | None = None):
        """The control image, at ``size`` = (width, height) (default: the file's size); ``analyzer`` finds the
        face for ``"kps"``."""
        return make_control_image(self.kind, load_image(self.image), size=size, analyzer=analyzer)

    def record(self, controlnet: str) -> dict[str, Any]:
        """What an image made with this control records of it, ``controlnet`` the ControlNet that read it."""
        return {"kind": self.kind, "image": file_record(self.image), "scale": self.scale,
                "controlnet": source_record(controlnet)}  # fmt: skip
