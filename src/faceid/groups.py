"""The token groups of one call: several people in one picture, and style or composition references.

Each person's identity tokens and each reference image's tokens become one ``faceid.attention.TokenGroup``
with its own scale, region and step window; the processor adds them all in every cross-attention layer.
This module turns what a user gives into those groups:

* ``regions``: where each person goes. ``"auto"`` lays the people out left to right in equal columns;
  boxes ``(x0, y0, x1, y1)`` in fractions of the picture; mask images (white: the person); or a photo with
  several people, whose faces (sorted left to right) split the picture into one column per person, at the
  midpoints between neighbouring faces. Person ``k`` of ``face=[...]`` goes to region ``k``.
* ``Reference``: an image read by a standard IP-Adapter (``faceid.references``), with its scale, window
  and optional region.

With one person and no reference, the call's one group is the identity, as a FaceID call has always been.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attention import TokenGroup
from .errors import FaceIDError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Reference:
    """A style or composition reference image, read by a loaded standard IP-Adapter.

    ``adapter``: the name it was loaded under (``FaceIDPipeline.load_reference``; None: the only one
    loaded). ``window``: the fraction of the steps it acts in (None: all). ``region``: a box ``(x0, y0, x1,
    y1)`` in fractions, or a mask image; None: the whole picture. ``face_crop``: read the aligned 224x224 crop
    of the image's face (largest first) instead of the whole image, as Plus-Face was trained.
    """

    image: Any
    scale: float = 0.5
    adapter: str | None = None
    window: tuple[float, float] | None = None
    region: Any = None
    face_crop: bool = False


@dataclass
class EncodedReference:
    """A reference's tokens (one row each: the same for every image of the call) and how it applies."""

    adapter: str
    tokens: torch.Tensor  # (1, tokens, dim)
    uncond_tokens: torch.Tensor
    scale: float
    window: tuple[float, float] | None
    region: Any
    face_crop: bool = False


def auto_layout(count: int) -> list[Box]:
    """``count`` equal columns, left to right."""
    return [(k / count, 0.0, (k + 1) / count, 1.0) for k in range(count)]


def columns_from_faces(boxes: Sequence[Sequence[float]], width: int, count: int, name: str = "the image") -> list[Box]:
    """One full-height column per person from the face boxes (pixels) found in a photo ``width`` pixels wide:
    the faces sorted left to right, the picture split at the midpoints between neighbouring faces."""
    if len(boxes) < count:
        raise FaceIDError(
            f"{count} people to place but {len(boxes)} face(s) found in {name}: use a photo with a face for "
            "each person, or give regions as boxes or 'auto'"
        )
    centres = sorted((float(b[0]) + float(b[2])) / 2 / width for b in boxes)
    if len(centres) > count:
        raise FaceIDError(
            f"{len(centres)} faces found in {name} for {count} people: give one face per person "
            f"(face=[...] with {len(centres)} entries) or a photo with {count} faces"
        )
    cuts = [0.0] + [(a + b) / 2 for a, b in zip(centres, centres[1:], strict=False)] + [1.0]
    return [(cuts[k], 0.0, cuts[k + 1], 1.0) for k in range(count)]


def is_box(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def check_box(box: Sequence[float], what: str) -> Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise FaceIDError(
            f"{what} {tuple(box)} is not a box (x0, y0, x1, y1) in fractions of the picture with 0 <= x0 < x1 <= 1 "
            "and 0 <= y0 < y1 <= 1"
        )
    return (x0, y0, x1, y1)


def region_mask(region: Any, width: int, height: int, what: str = "region") -> torch.Tensor:
    """A region as a ``(1, height, width)`` float mask in [0, 1]: a box in fractions, or a mask image
    (white: inside; resized to the picture)."""
    if is_box(region):
        x0, y0, x1, y1 = check_box(region, what)
        mask = torch.zeros(1, height, width)
        mask[:, round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 1.0
        return mask
    from PIL import Image

    from .images import load_image

    try:
        image = region if isinstance(region, Image.Image) else load_image(region)
    except FaceIDError:
        raise
    except Exception as exc:
        raise FaceIDError(f"{what} is neither a box (x0, y0, x1, y1) nor a mask image ({exc})") from exc
    gray = np.asarray(image.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(gray)[None]


def resolve_regions(
    regions: Any, count: int, analyze: Callable[[Any], list] | None = None
) -> tuple[str | list[Box], list]:
    """``regions`` as the settings record it (``"auto"``, boxes, or ``"masks"``) and as the call uses it
    (one box or mask image per person). ``analyze`` (photo -> faces) reads a photo with several people; without
    it, only ``"auto"``, boxes and masks are checked (e.g. a service validating a request before it runs)."""
    if isinstance(regions, str) and regions == "auto":
        return "auto", auto_layout(count)
    if isinstance(regions, (list, tuple)) and not is_box(regions):
        if len(regions) != count:
            raise FaceIDError(f"{len(regions)} regions for {count} people: give one region per person")
        if all(is_box(r) for r in regions):
            boxes = [check_box(r, f"region {k}") for k, r in enumerate(regions)]
            return boxes, boxes
        if any(is_box(r) for r in regions):
            raise FaceIDError("give every region as a box, or every region as a mask image, not a mix")
        return "masks", list(regions)
    # A photo with several people: their faces, left to right.
    from .images import load_image

    if analyze is None:
        raise FaceIDError("regions from a photo with several people need face analysis (analyze=)")
    image = load_image(regions)
    faces = analyze(image)
    boxes = columns_from_faces([f.box for f in faces], image.width, count, "the regions photo")
    return boxes, boxes


def token_groups(
    identity: torch.Tensor,
    null_identity: torch.Tensor,
    regions: list,
    references: Sequence[EncodedReference],
    images: int,
    classifier_free_guidance: bool,
    width: int,
    height: int,
    identity_branch: str,
    identity_scale: float = 1.0,
) -> tuple[list[TokenGroup], list[TokenGroup]]:
    """The groups of a call in the UNet's batch order (each person's identity, then each reference), and those
    of the references alone.

    ``identity``: the identity tokens in batch order, ``(batch, tokens, dim)`` for one person or ``(batch,
    people, tokens, dim)``; ``null_identity``: those for "no identity" of the conditional entries (identity
    guidance). ``regions``: one box or mask per person (several people only). ``images``: the conditional
    entries of the batch. ``identity_scale``: the weight of every person's tokens.
    """
    groups: list[TokenGroup] = []
    if identity.ndim == 3:
        groups.append(TokenGroup(identity, identity_branch, identity_scale, null=null_identity))
    else:
        device = identity.device
        for k in range(identity.shape[1]):
            mask = region_mask(regions[k], width, height, f"region {k}").to(device)
            groups.append(
                TokenGroup(identity[:, k], identity_branch, identity_scale, mask=mask, null=null_identity[:, k])
            )
    referenced = []
    for k, ref in enumerate(references):
        cond = ref.tokens.expand(images, -1, -1)
        tokens = torch.cat([ref.uncond_tokens.expand(images, -1, -1), cond]) if classifier_free_guidance else cond
        mask = None
        if ref.region is not None:
            mask = region_mask(ref.region, width, height, f"reference {k}'s region").to(tokens.device)
        referenced.append(TokenGroup(tokens.contiguous(), ref.adapter, ref.scale, mask=mask))
    return groups + referenced, referenced
