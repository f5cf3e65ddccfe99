"""Adapter combinations: a FaceID adapter together with a standard IP-Adapter reading the same face photo.

FaceID conditions on the ArcFace embedding: who the person is. A standard IP-Adapter reads the photo through
CLIP: how the face looks in it (skin, hair, light). cubiq (ComfyUI_IPAdapter_plus) recommends stacking the
two: FaceID-PlusV2 at 0.8 with IP-Adapter Plus-Face at 0.4, both fed the same photo. ``COMBOS`` holds such
recipes by name; the Python API and ``faceid generate --combo NAME`` read them here::

    combo = COMBOS["plusv2+plus-face"]
    pipe = FaceIDPipeline.from_pretrained(adapter=combo.adapter("SD1.5"))
    pipe.load_reference(combo.reference)
    pipe("a photo of a person", face="me.jpg", scale=combo.scale, style=combo.style("me.jpg"))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import FaceIDError


@dataclass(frozen=True)
class AdapterCombo:
    """A FaceID release per base model family at ``scale``, with the standard IP-Adapter ``reference``
    (a kind of ``faceid.references.REFERENCE_ADAPTERS``) reading the face photo at ``reference_scale``."""

    name: str
    adapters: Mapping[str, str]  # base model family -> released FaceID adapter (``faceid.variants.VARIANTS``)
    scale: float
    reference: str
    reference_scale: float
    description: str

    def adapter(self, family: str) -> str:
        """The combination's FaceID release for a base model family (``"SD1.5"``, ``"SDXL"``)."""
        if family not in self.adapters:
            raise FaceIDError(f"{self.name} has no adapter for {family} (it has {', '.join(self.adapters)})")
        return self.adapters[family]

    def style(self, photo: Any, adapter: str | None = None) -> list:
        """The references to pass as ``style=``: the aligned crop of the photo's face (a photo or a ``Face``),
        read by the reference adapter loaded under ``adapter`` (default: the name ``load_reference(self.reference)``
        gives it, the kind)."""
        from .groups import Reference

        return [Reference(photo, self.reference_scale, adapter or self.reference, face_crop=True)]


COMBOS: dict[str, AdapterCombo] = {
    c.name: c
    for c in (
        AdapterCombo(
            "plusv2+plus-face",
            {"SD1.5": "faceid-plusv2-sd15", "SDXL": "faceid-plusv2-sdxl"},
            scale=0.8,
            reference="plus-face",
            reference_scale=0.4,
            description="FaceID-PlusV2 at 0.8 with IP-Adapter Plus-Face at 0.4 on the same face photo (cubiq's "
            "recommendation): the identity from FaceID, the look of the face from CLIP",
        ),
    )
}
