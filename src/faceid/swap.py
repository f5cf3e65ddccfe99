"""Put a person into a photo: repaint one face of a target photo with another person's identity.

One stage, target photo + identity -> edited photo, in three steps:

1. :func:`load_target`: the target loaded upright (EXIF orientation applied), its faces found, one chosen
   (``face_index``, 0 = largest), and a user's mask checked against its size, so that every bad input fails
   before any model loads.
2. :func:`plan_swap`: the geometry. A square-ish crop around the face (the face grown by ``margin`` on each
   side, clamped to the photo), the size it is generated at (the longer side at the model's ``resolution``,
   both sides multiples of 8: a 4000-pixel photo is never generated at 4000 pixels), and a feathered mask: the
   convex hull of the ellipse in the face box and the 5 landmarks (or the user's mask), grown and softened by
   a Gaussian blur, in crop coordinates (what the inpainter gets) and in the photo's.
3. :func:`swap_face`: the crop and its mask at the generation size go to an ``inpaint`` callable (any
   inpainter: :func:`pipeline_inpaint` wraps a ``FaceIDPipeline``), the result is resized back to the crop
   and blended into the photo with the feathered mask. Where the photo's mask is 0, the output is the target,
   bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .errors import FaceIDError, MaskError
from .faces import Face, FaceAnalyzer, select_face
from .images import ImageSource, load_image, source_name

__all__ = [
    "DEFAULT_FEATHER",
    "DEFAULT_MARGIN",
    "DEFAULT_SWAP_PROMPT",
    "Inpaint",
    "SwapPlan",
    "SwapResult",
    "SwapTarget",
    "load_target",
    "pipeline_inpaint",
    "plan_swap",
    "swap_face",
]

#: Crop margin around the face, as a fraction of the face's size added on each side: the face spans about
#: 1 / (1 + 2 * margin) of the crop (45% by default), a size at which SD draws a face well, with context.
DEFAULT_MARGIN = 0.6
#: Width of the mask's soft edge, as a fraction of the face's size.
DEFAULT_FEATHER = 0.2
#: The prompt ``faceid swap`` inpaints with when none is given.
DEFAULT_SWAP_PROMPT = "a photo of a person's face, natural skin, best quality"

#: ``inpaint(crop, mask, (width, height)) -> image``: ``crop`` (RGB) and ``mask`` (L, white = repaint,
#: feathered) are both ``(width, height)``; the result must be an image of that size.
Inpaint = Callable[[Image.Image, Image.Image, tuple[int, int]], Image.Image]


@dataclass(frozen=True, eq=False)
class SwapTarget:
    """A target photo ready to be edited: ``image`` upright RGB, the chosen ``face`` among ``faces``
    (largest first), the user's ``mask`` (L, the image's size) or None, and the photo's ``name``."""

    image: Image.Image
    face: Face
    faces: list[Face]
    mask: Image.Image | None
    name: str


@dataclass(frozen=True, eq=False)
class SwapPlan:
    """Where and how one face is repainted.

    ``box``: the crop (x1, y1, x2, y2) in the photo's pixels, x2/y2 exclusive. ``size``: (width, height)
    the crop is generated at, multiples of 8. ``crop_mask``: the feathered mask at ``size`` (L, white =
    repaint), what the inpainter gets. ``mask``: the same mask in the photo's pixels (L, the photo's size),
    0 everywhere outside ``box``.
    """

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    crop_mask: Image.Image
    mask: Image.Image

    def crop(self, image: Image.Image) -> Image.Image:
        """``image``'s crop box resized to the generation size (what the inpainter gets)."""
        return image.crop(self.box).resize(self.size, Image.Resampling.LANCZOS)


@dataclass(frozen=True, eq=False)
class SwapResult:
    """``image``: the edited photo (the target's size, upright, no EXIF); ``mask``: where it may differ from
    the target (the plan's feathered mask in the photo's pixels); ``plan``: the crop and masks used."""

    image: Image.Image
    mask: Image.Image
    plan: SwapPlan


def load_target(
    target: ImageSource, *, analyzer: FaceAnalyzer, face_index: int = 0, mask: ImageSource | None = None
) -> SwapTarget:
    """The target photo upright (EXIF orientation applied), its face number ``face_index`` (0 = largest)
    and the user's ``mask`` (white = repaint; the size of the upright photo), or the error that says why not:
    ``ImageError`` for an unreadable photo or mask, ``NoFaceError`` naming the photo when it has no face,
    ``FaceSelectionError`` when ``face_index`` is not one of its faces, ``MaskError`` for a mask of another
    size or with nothing to repaint."""
    name = source_name(target)
    image = load_image(target)
    user_mask = None if mask is None else _load_mask(mask, image.size, name)
    faces = analyzer.analyze(image)
    face = select_face(faces, face_index, name)
    return SwapTarget(image=image, face=face, faces=faces, mask=user_mask, name=name)


def plan_swap(
    target_image: Image.Image,
    face: Face,
    *,
    resolution: int = 512,
    margin: float = DEFAULT_MARGIN,
    feather: float = DEFAULT_FEATHER,
    mask: Image.Image | None = None,
) -> SwapPlan:
    """The crop, generation size and feathered masks that repaint ``face`` of ``target_image``.

    The crop is a square around the face box (its longer side grown by ``margin`` of it on each side), widened
    where needed to hold the whole feathered mask, and shifted (then cut) to stay inside the photo; its longer
    side is generated at ``resolution`` (a multiple of 8, at least 64), the shorter in proportion, rounded to a
    multiple of 8. The mask: the convex hull of the ellipse inscribed in the face box and the 5 landmarks (or
    ``mask``, the user's, L in the photo's pixels: 128 and above = repaint), grown by ``feather / 2`` of the face
    size and blurred (three box filters, close to a Gaussian of sigma ``feather / 4`` of the face size, in time
    independent of it): about 1 over the whole region, fading to exactly 0 within ``1.25 * feather`` of the face
    size outside it, always inside the crop.
    """
    _check_plan_arguments(resolution, margin, feather)
    width, height = target_image.size
    x1, y1, x2, y2 = (float(v) for v in face.box)
    face_size = max(x2 - x1, y2 - y1, 1.0)
    half = max(1, round(feather * face_size / 4))  # the blur: 3 box filters 2 * half + 1 wide (sigma ~ half)
    radius = 3 * half  # how far the blur reaches: exactly 0 beyond
    grow = feather * face_size / 2  # the region is grown by this much, so that it stays ~1 after the blur

    if mask is None:
        hull = _face_hull(face, grow=grow)
        region_box = (*hull.min(axis=0), *hull.max(axis=0))
    else:
        ys, xs = np.nonzero(np.asarray(mask) >= 128)
        if xs.size == 0:
            raise MaskError("the mask has nothing to repaint: no pixel is 128 or more (white = repaint)")
        region_box = (xs.min() - grow, ys.min() - grow, xs.max() + 1 + grow, ys.max() + 1 + grow)
    # The square around the face, united with the region plus the blur's reach: the mask is 0 at the crop's
    # edges wherever they are inside the photo, so the paste-back has no seam.
    side = face_size * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    want = (
        min(cx - side / 2, region_box[0] - radius - 2),
        min(cy - side / 2, region_box[1] - radius - 2),
        max(cx + side / 2, region_box[2] + radius + 2),
        max(cy + side / 2, region_box[3] + radius + 2),
    )
    bx1, bx2 = _fit(want[0], want[2], width)
    by1, by2 = _fit(want[1], want[3], height)
    box = (bx1, by1, bx2, by2)

    # The hard region on the crop padded by the blur's reach (past the photo's edges the region goes on, so a
    # face cut by the border stays fully masked up to it), blurred, the padding cut off again.
    pad_w, pad_h = bx2 - bx1 + 2 * radius, by2 - by1 + 2 * radius
    if mask is None:
        canvas = np.zeros((pad_h, pad_w), np.float32)
        origin = np.array([bx1 - radius, by1 - radius], np.float64)
        points = np.round((hull - origin) * 16).astype(np.int32)  # 4 bits of sub-pixel precision
        cv2.fillConvexPoly(canvas, points, 1.0, lineType=cv2.LINE_AA, shift=4)
    else:
        inside = (np.asarray(mask)[by1:by2, bx1:bx2] >= 128).astype(np.uint8)
        padded = cv2.copyMakeBorder(inside, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
        # Grown: every pixel within ``grow`` of the region (a distance transform: linear time at any size).
        distance = cv2.distanceTransform(1 - padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        canvas = (distance <= grow).astype(np.float32)
    soft = canvas
    for _ in range(3):
        soft = cv2.blur(soft, (2 * half + 1, 2 * half + 1), borderType=cv2.BORDER_CONSTANT)
    soft = soft[radius : radius + by2 - by1, radius : radius + bx2 - bx1]
    crop_mask = np.clip(np.rint(soft * 255.0), 0, 255).astype(np.uint8)

    full = np.zeros((height, width), np.uint8)
    full[by1:by2, bx1:bx2] = crop_mask
    size = _generation_size(bx2 - bx1, by2 - by1, resolution)
    crop_mask_image = Image.fromarray(crop_mask).resize(size, Image.Resampling.BILINEAR)
    return SwapPlan(box=box, size=size, crop_mask=crop_mask_image, mask=Image.fromarray(full))


def swap_face(
    target: ImageSource | SwapTarget,
    inpaint: Inpaint,
    *,
    analyzer: FaceAnalyzer | None = None,
    face_index: int = 0,
    mask: ImageSource | None = None,
    resolution: int = 512,
    margin: float = DEFAULT_MARGIN,
    feather: float = DEFAULT_FEATHER,
) -> SwapResult:
    """Repaint face ``face_index`` of ``target`` with ``inpaint`` and blend it back into the photo.

    ``target``: a photo (path, bytes, PIL image, array; its faces found by ``analyzer``, the face and ``mask``
    chosen and checked by :func:`load_target`), or a :class:`SwapTarget` that ``load_target`` made (found once,
    swapped many times; ``analyzer``, ``face_index`` and ``mask`` are then its own). ``inpaint(crop, mask,
    (width, height))`` gets the crop around the face and its feathered mask at the generation size
    (:func:`plan_swap`: ``resolution``, ``margin``, ``feather``) and returns the repainted crop at that size; the
    identity is its business (:func:`pipeline_inpaint` binds a person's faces to a ``FaceIDPipeline``).

    The result has the target's size and upright orientation (EXIF orientation applied); it carries no EXIF:
    its pixels are already upright (the photo's orientation tag would rotate it a second time) and the photo's
    metadata is not copied. Where the result's ``mask`` is 0 its pixels are the target's, bit for bit.
    """
    if isinstance(target, SwapTarget):
        if analyzer is not None or face_index != 0 or mask is not None:
            raise ValueError("a SwapTarget has its face and mask already: pass analyzer, face_index and mask "
                             "to load_target")  # fmt: skip
    else:
        if analyzer is None:
            raise ValueError("swap_face needs an analyzer to find the face in the target photo")
        target = load_target(target, analyzer=analyzer, face_index=face_index, mask=mask)
    plan = plan_swap(target.image, target.face, resolution=resolution, margin=margin, feather=feather, mask=target.mask)
    painted = inpaint(plan.crop(target.image), plan.crop_mask.copy(), plan.size)
    if not isinstance(painted, Image.Image) or painted.size != plan.size:
        got = f"a {painted.size[0]}x{painted.size[1]} image" if isinstance(painted, Image.Image) else repr(painted)
        raise ValueError(f"inpaint returned {got}; it must return a PIL image of {plan.size[0]}x{plan.size[1]}")
    x1, y1, x2, y2 = plan.box
    back = np.asarray(painted.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), np.uint32)
    out = np.array(target.image)  # a copy: the target stays as it was
    alpha = np.asarray(plan.mask, np.uint32)[y1:y2, x1:x2, None]
    original = out[y1:y2, x1:x2].astype(np.uint32)
    # Integer blend, rounded: alpha 0 gives the target exactly, 255 the repainted pixel exactly.
    out[y1:y2, x1:x2] = ((original * (255 - alpha) + back * alpha + 127) // 255).astype(np.uint8)
    return SwapResult(image=Image.fromarray(out), mask=plan.mask, plan=plan)


def pipeline_inpaint(pipe, settings, faces, **call_kwargs) -> Inpaint:
    """An :data:`Inpaint` that repaints with a ``FaceIDPipeline``'s inpainting: ``faces`` (one person: Face
    objects, photos or embeddings) and ``settings`` (``GenerationSettings`` or a mapping: prompt, seed, steps,
    ...; one image) at the size ``swap_face`` asks for. ``call_kwargs`` go to the pipeline call as they are
    (``callback_on_step_end``: the server's progress and cancellation)."""

    def inpaint(crop: Image.Image, mask: Image.Image, size: tuple[int, int]) -> Image.Image:
        width, height = size
        result = pipe(
            face=[list(faces)],
            settings=settings,
            init_image=crop,
            mask_image=mask,
            width=width,
            height=height,
            num_images_per_prompt=1,
            **call_kwargs,
        )
        return result.images[0]

    return inpaint


# ----------------------------------------------------------------------------------------------
# Helpers


def _load_mask(mask: ImageSource, size: tuple[int, int], target_name: str) -> Image.Image:
    """The user's mask as L, checked: the size of the upright target, something to repaint."""
    name = source_name(mask)
    image = load_image(mask).convert("L")
    if image.size != size:
        raise MaskError(
            f"Mask {name} is {image.size[0]}x{image.size[1]} but the target {target_name} is {size[0]}x{size[1]} "
            "(upright, after its EXIF orientation); make the mask the target's size, white where to repaint."
        )
    if not (np.asarray(image) >= 128).any():
        raise MaskError(f"Mask {name} has nothing to repaint: paint white where {target_name} should change.")
    return image


def _check_plan_arguments(resolution: int, margin: float, feather: float) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 64 or resolution % 8:
        raise FaceIDError(
            f"resolution {resolution!r} is not a size a Stable Diffusion model generates at: "
            "give a multiple of 8, at least 64 (512 for SD1.5, 1024 for SDXL)"
        )
    if not margin >= 0:
        raise FaceIDError(f"margin {margin!r} must be at least 0 (a fraction of the face's size)")
    if not feather > 0:
        raise FaceIDError(f"feather {feather!r} must be more than 0 (a fraction of the face's size)")


def _face_hull(face: Face, grow: float) -> np.ndarray:
    """The convex hull (N x 2 floats, photo pixels) of the face box's inscribed ellipse and the landmarks,
    grown by ``grow`` pixels: the ellipse's semi-axes and the landmarks' distance from the centre."""
    x1, y1, x2, y2 = (float(v) for v in face.box)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    axes = np.array([(x2 - x1) / 2 + grow, (y2 - y1) / 2 + grow])
    ellipse = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * axes
    landmarks = np.asarray(face.landmarks, np.float64).reshape(-1, 2)
    offsets = landmarks - centre
    lengths = np.maximum(np.linalg.norm(offsets, axis=1, keepdims=True), 1e-6)
    grown = centre + offsets * (1 + grow / lengths)
    points = np.concatenate([ellipse, grown]).astype(np.float32)
    return cv2.convexHull(points).reshape(-1, 2).astype(np.float64)


def _fit(low: float, high: float, limit: int) -> tuple[int, int]:
    """The span [low, high) in whole pixels, shifted to start at 0 or end at ``limit`` where it crosses one
    (keeping its length), and cut to [0, limit) where it is longer than that."""
    length = min(limit, max(1, math.ceil(high) - math.floor(low)))
    start = min(max(0, math.floor(low)), limit - length)
    return start, start + length


def _generation_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) with the longer side ``resolution`` and the shorter in proportion, multiples of 8."""
    scale = resolution / max(width, height)
    return (max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8))
