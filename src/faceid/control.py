"""Control images for ControlNet, made from a reference photo: one stage, photo -> control image.

:func:`make_control_image` turns a photo into the image a ControlNet of that kind is conditioned on:

* ``"canny"``: OpenCV's Canny edges, white on black, 3 channels (what the canny ControlNets were trained on);
* ``"kps"``: the 5 face landmarks drawn the way InstantID draws them (coloured sticks from each eye and mouth
  corner to the nose tip, a disc at each point, on black), from faceid's own face analysis;
* ``"pose"``: the OpenPose body skeleton (18 COCO keypoints, OpenPose's colours), from the OpenPose body
  network (``body_pose_model.pth`` of ``lllyasviel/Annotators``, the ControlNet annotators' weights);
* ``"depth"``: relative depth (near = bright) from transformers' depth-estimation pipeline, 3 channels;
* ``"image"``: the photo as it is (it already is a control image).

**Size.** The control image is made in the frame of the generated image: ``size=(width, height)``, or the
photo's own size when ``None``. The photo is fitted to that frame keeping its aspect ratio, the way the
ControlNet web UI's resize modes do: ``fit="crop"`` (its default, "Crop and Resize": scaled to cover the
frame, centred, the overflow cut off) or ``fit="pad"`` ("Resize and Fill": scaled to fit inside, centred,
black bars). Detections (face landmarks, body keypoints) are made on the full photo and mapped into that
frame, and their drawings are made at the output size, so sticks and discs keep their width and colours.

OpenPose is written here on torch (the network is a plain VGG/CPM stack) rather than taken from
``controlnet_aux``: that package imports torchvision, timm and einops at import time, and installing
torchvision switches transformers' CLIP image processor to another backend, which would change faceid's
identity inputs. The keypoint association is a simplification of OpenPose's: part-affinity-scored limbs,
matched greedily, joined into people.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import FaceIDError, NoPersonError
from .hub import HubFile
from .images import ImageSource, load_image, source_name

__all__ = [
    "DEPTH_MODEL",
    "FITS",
    "KINDS",
    "OPENPOSE_BODY",
    "OpenPoseBody",
    "annotator_options",
    "draw_skeleton",
    "make_control_image",
    "openpose_people",
]

KINDS = ("canny", "kps", "pose", "depth", "image")
FITS = ("crop", "pad")

#: The OpenPose body weights ControlNet's annotators use (CMU's COCO body model, converted to torch).
#: The sha256 is the Git LFS oid of the file, the same in every copy on the Hub; the commit is not pinned.
OPENPOSE_BODY = HubFile(
    "lllyasviel/Annotators",
    "body_pose_model.pth",
    revision=None,
    sha256="25a948c16078b0f08e236bda51a385d855ef4c153598947c28c0d47ed94bb746",
    size=209267595,
)

#: Default depth model: Depth Anything (small, Apache-2.0), transformers' format, pinned by commit and hash.
DEPTH_MODEL = HubFile(
    "LiheYoung/depth-anything-small-hf",
    "model.safetensors",
    revision="16030b54c8f28bf6a81db58d5d738ac990a3f0a8",
    sha256="7997c812d8964a741eec21e6816ec2db1e442b5109ea2e7db26dcb03c9060ef0",
)

# InstantID's draw_kps: sticks from each eye and mouth corner to the nose tip, coloured as their outer point.
_KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
_KPS_LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]

# OpenPose (COCO 18: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee,
# r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear). The first 17 limbs are drawn (the ear-shoulder
# ones only help association); limb i and keypoint i share colour i.
_POSE_LIMBS = [
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
]  # fmt: skip
# The two PAF channels (x, y) of each limb, in the order above.
_POSE_PAF = [
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
]  # fmt: skip
_POSE_COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip

_OPTIONS = {
    "canny": {"low_threshold", "high_threshold"},
    "kps": set(),
    "pose": {"pose_model", "device"},
    "depth": {"depth_model", "device"},
    "image": set(),
}


def make_control_image(
    kind: str,
    image: ImageSource,
    *,
    size: tuple[int, int] | None = None,
    analyzer=None,
    face_index: int | str = 0,
    fit: str = "crop",
    **options: Any,
) -> Image.Image:
    """The ``kind`` control image of ``image`` (a path, bytes, PIL image or array), as an RGB PIL image of
    ``size`` = (width, height) (default: the photo's size), the photo fitted to it by ``fit`` (module doc).

    ``analyzer`` (``"kps"``): the :class:`~faceid.faces.FaceAnalyzer` (default: buffalo_l); ``face_index``
    chooses among several faces, largest first, or ``"all"`` draws every face (several people). Options by kind: ``"canny"``: ``low_threshold`` (100),
    ``high_threshold`` (200); ``"pose"``: ``pose_model`` (a ``body_pose_model.pth`` path, or an
    :class:`OpenPoseBody`; default the pinned Hub file), ``device``; ``"depth"``: ``depth_model`` (a
    transformers depth-estimation model name or folder, or a ready ``pipeline``; default
    :data:`DEPTH_MODEL`), ``device``.

    Raises :class:`~faceid.errors.ImageError` for an unreadable photo, ``NoFaceError`` /
    ``FaceSelectionError`` for ``"kps"`` without that face, :class:`~faceid.errors.NoPersonError` for
    ``"pose"`` without a person, and :class:`~faceid.errors.FaceIDError` for an unknown kind or option.
    """
    import cv2  # here, not at import: the CLI builds its parser without it

    if kind not in KINDS:
        raise FaceIDError(f"unknown control image kind {kind!r}: use one of {', '.join(KINDS)}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        takes = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise FaceIDError(f"unknown option(s) {', '.join(unknown)} for a {kind} control image (it takes: {takes})")
    if fit not in FITS:
        raise FaceIDError(f"unknown fit {fit!r}: use one of {', '.join(FITS)}")
    name = source_name(image)
    photo = load_image(image)
    out_size = _check_size(photo.size if size is None else size)
    frame = _Frame(photo.size, out_size, fit)

    if kind == "kps":
        from .faces import FaceAnalyzer, select_face

        analyzer = analyzer if analyzer is not None else FaceAnalyzer.from_pretrained()
        found = analyzer.analyze(photo)
        if face_index == "all":
            faces = found or [select_face(found, 0, name)]  # none found: the no-face error
        else:
            faces = [select_face(found, face_index, name)]
        canvas = np.zeros((out_size[1], out_size[0], 3), np.uint8)
        colors = [_KPS_COLORS[a] for a, _ in _KPS_LIMBS]
        for face in faces:
            draw_skeleton(out_size, frame.points(face.landmarks), _KPS_LIMBS, colors, _KPS_COLORS, 10, canvas)
        return Image.fromarray(canvas)
    if kind == "pose":
        body = options.get("pose_model")
        if not isinstance(body, OpenPoseBody):
            body = OpenPoseBody.from_pretrained(body, device=options.get("device"))
        people = openpose_people(body, np.asarray(photo))
        if not people:
            raise NoPersonError(
                f"no person found in {name} for a pose control image; give a photo with a person, "
                "or another control kind"
            )
        canvas = np.zeros((out_size[1], out_size[0], 3), np.uint8)
        for person in people:
            draw_skeleton(out_size, frame.points(person), _POSE_LIMBS[:17], _POSE_COLORS, _POSE_COLORS, 4, canvas)
        return Image.fromarray(canvas)

    fitted = frame.image(photo)
    if kind == "canny":
        low, high = options.get("low_threshold", 100), options.get("high_threshold", 200)
        edges = cv2.Canny(np.asarray(fitted), low, high)
        return Image.fromarray(edges).convert("RGB")
    if kind == "depth":
        return _depth_pipeline(options.get("depth_model"), options.get("device"))(fitted)["depth"].convert("RGB")
    return fitted  # "image"


def annotator_options(kind: str, device=None) -> dict[str, Any]:
    """The models ``make_control_image(kind, ...)`` would load on every call (OpenPose's body network for
    ``"pose"``, the depth pipeline for ``"depth"``; none for the other kinds), loaded once on ``device``: pass
    them as its options to make many control images (``make_control_image(kind, photo, **options)``)."""
    if kind not in KINDS:
        raise FaceIDError(f"unknown control image kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "pose":
        return {"pose_model": OpenPoseBody.from_pretrained(device=device)}
    if kind == "depth":
        return {"depth_model": _depth_pipeline(None, device)}
    return {}


# ----------------------------------------------------------------------------------------------- geometry


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise FaceIDError(f"control image size must be (width, height), got {size!r}") from None
    if width <= 0 or height <= 0:
        raise FaceIDError(f"control image size must be positive, got {width}x{height}")
    return width, height


class _Frame:
    """Where the photo lands in the output frame: the source box it shows, scaled onto the destination box."""

    def __init__(self, photo_size: tuple[int, int], out_size: tuple[int, int], fit: str) -> None:
        (w, h), (ow, oh) = photo_size, out_size
        if fit == "crop":  # cover the frame, centred; cut the overflow
            scale = max(ow / w, oh / h)
            sw, sh = ow / scale, oh / scale
            self.src = ((w - sw) / 2, (h - sh) / 2, (w + sw) / 2, (h + sh) / 2)
            self.dst = (0, 0, ow, oh)
        else:  # "pad": fit inside the frame, centred; black bars
            scale = min(ow / w, oh / h)
            dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
            x0, y0 = (ow - dw) // 2, (oh - dh) // 2
            self.src = (0.0, 0.0, float(w), float(h))
            self.dst = (x0, y0, x0 + dw, y0 + dh)
        self.out_size = out_size

    def points(self, points: np.ndarray) -> np.ndarray:
        """Photo pixel coordinates (N, 2) -> output pixel coordinates (NaN stays NaN)."""
        sx0, sy0, sx1, sy1 = self.src
        dx0, dy0, dx1, dy1 = self.dst
        scale = np.array([(dx1 - dx0) / (sx1 - sx0), (dy1 - dy0) / (sy1 - sy0)])
        return (np.asarray(points, np.float64) - (sx0, sy0)) * scale + (dx0, dy0)

    def image(self, photo: Image.Image) -> Image.Image:
        dx0, dy0, dx1, dy1 = self.dst
        fitted = photo.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS, box=self.src)
        if fitted.size == self.out_size:
            return fitted
        canvas = Image.new("RGB", self.out_size)
        canvas.paste(fitted, (dx0, dy0))
        return canvas


# ----------------------------------------------------------------------------------------------- drawing


def draw_skeleton(
    size: tuple[int, int],
    points: np.ndarray,
    limbs: Sequence[tuple[int, int]],
    limb_colors: Sequence[tuple[int, int, int]],
    point_colors: Sequence[tuple[int, int, int]],
    radius: int,
    canvas: np.ndarray | None = None,
    stickwidth: int = 4,
) -> Image.Image:
    """Keypoints drawn the way InstantID (``draw_kps``) and OpenPose (``draw_bodypose``) draw them, on black
    (or onto ``canvas``, an HxWx3 uint8 array, in place): each limb a filled ellipse ``stickwidth`` wide in 60%
    of its colour, then a disc of ``radius`` in full colour at each point. Points with NaN are skipped."""
    import cv2  # here, not at import: the CLI builds its parser without it

    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8) if canvas is None else canvas
    points = np.asarray(points, np.float64)
    for (a, b), color in zip(limbs, limb_colors, strict=False):
        (xa, ya), (xb, yb) = points[a], points[b]
        if np.isnan([xa, ya, xb, yb]).any():
            continue
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(center, (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for (x, y), color in zip(points, point_colors, strict=False):
        if not np.isnan([x, y]).any():
            cv2.circle(canvas, (int(x), int(y)), radius, color, -1)
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------------------------- OpenPose


def _openpose_layers() -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of every conv of OpenPose's body network, named as in body_pose_model.pth;
    a name "pool" is a 2x2 max-pool."""
    vgg = [("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool", ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool"]
    vgg += [("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), "pool"]
    vgg += [("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128)]
    return [("pool", 0, 0, 0) if v == "pool" else (*v, 3) for v in vgg]


def _openpose_stage(stage: int, branch: int, out: int) -> list[tuple[str, int, int, int]]:
    if stage == 1:
        sizes = [(128, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, out, 1)]
        return [(f"conv5_{i + 1}_CPM_L{branch}", *s) for i, s in enumerate(sizes)]
    sizes = [(185, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, out, 1)]
    return [(f"Mconv{i + 1}_stage{stage}_L{branch}", *s) for i, s in enumerate(sizes)]


def _openpose_network():
    import torch
    from torch import nn

    def block(layers, relu_last: bool) -> nn.Sequential:
        modules = []
        for i, (name, cin, cout, k) in enumerate(layers):
            if name == "pool":
                modules.append(nn.MaxPool2d(2, 2))
                continue
            modules.append(nn.Conv2d(cin, cout, k, 1, k // 2))
            if i < len(layers) - 1 or relu_last:
                modules.append(nn.ReLU())
        return nn.Sequential(*modules)

    class Network(nn.Module):
        """OpenPose's body network (6 stages; PAFs in branch L1, heatmaps in L2). State-dict keys are the
        layer names of body_pose_model.pth (see :meth:`load_released`)."""

        def __init__(self) -> None:
            super().__init__()
            self.features = block(_openpose_layers(), relu_last=True)
            # The released network ends its last heatmap stage with a ReLU (pytorch-openpose, ControlNet).
            self.pafs = nn.ModuleList(block(_openpose_stage(s, 1, 38), False) for s in range(1, 7))
            self.heatmaps = nn.ModuleList(block(_openpose_stage(s, 2, 19), s == 6) for s in range(1, 7))

        def forward(self, x):
            features = self.features(x)
            y = features
            for paf, heat in zip(self.pafs, self.heatmaps, strict=True):
                p, h = paf(y), heat(y)
                y = torch.cat([p, h, features], 1)
            return p, h

        def released_names(self) -> dict[str, str]:
            """Own state-dict key -> key in body_pose_model.pth."""
            names = {}
            stacks = [("features", _openpose_layers())]
            stacks += [(f"pafs.{s - 1}", _openpose_stage(s, 1, 38)) for s in range(1, 7)]
            stacks += [(f"heatmaps.{s - 1}", _openpose_stage(s, 2, 19)) for s in range(1, 7)]
            for prefix, layers in stacks:
                index = 0
                for name, *_ in layers:
                    if name != "pool":
                        for p in ("weight", "bias"):
                            names[f"{prefix}.{index}.{p}"] = f"{name}.{p}"
                    index += 1 if name == "pool" else 2
            return names

    return Network()


class OpenPoseBody:
    """OpenPose's body network and its decoding into people (18 keypoints each)."""

    def __init__(self, network, device=None) -> None:
        self.network = network.eval()
        self.device = device or "cpu"
        self.network.to(self.device)

    @staticmethod
    def network():
        """A randomly initialised body network (for tests; :meth:`from_pretrained` loads the weights)."""
        return _openpose_network()

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, device=None) -> OpenPoseBody:
        """The released body network: ``weights`` (a ``body_pose_model.pth``) or :data:`OPENPOSE_BODY`
        from the Hub (downloaded once, checked against its sha256)."""
        import torch

        from .errors import CheckpointError, MissingWeightsError
        from .hub import fetch

        if weights is None:
            path = fetch(OPENPOSE_BODY)
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise MissingWeightsError(
                    f"OpenPose weights not found: {path}. Give the path of body_pose_model.pth "
                    f"(https://huggingface.co/{OPENPOSE_BODY.repo}) or leave it out to download it"
                )
        network = _openpose_network()
        try:
            released = torch.load(path, map_location="cpu", weights_only=True)
            network.load_state_dict({own: released[theirs] for own, theirs in network.released_names().items()})
        except Exception as exc:  # not a torch file, another network's weights, wrong shapes
            raise CheckpointError(
                f"{path} is not OpenPose's body_pose_model.pth ({type(exc).__name__}: {str(exc)[:120]}); "
                f"use the file of https://huggingface.co/{OPENPOSE_BODY.repo}"
            ) from exc
        return cls(network, device)


def openpose_people(
    body: OpenPoseBody | Callable, rgb: np.ndarray, *, peak_threshold: float = 0.1, paf_threshold: float = 0.05
) -> list[np.ndarray]:
    """The people OpenPose finds in ``rgb`` (HxWx3 uint8): one (18, 2) array of pixel (x, y) each, NaN for a
    keypoint not found. As ControlNet's annotator runs it: one scale (the photo 184 px tall), BGR input in
    [-0.5, 0.5), heatmap peaks above ``peak_threshold`` after a Gaussian blur (sigma 3), limbs scored along
    their part affinity field; people with fewer than 4 parts or a mean score under 0.4 are dropped."""
    import cv2  # here, not at import: the CLI builds its parser without it
    import torch

    height, width = rgb.shape[:2]
    scale = 0.5 * 368 / height
    small = cv2.resize(rgb[:, :, ::-1], None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    sh, sw = small.shape[:2]
    padded = cv2.copyMakeBorder(small, 0, -sh % 8, 0, -sw % 8, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    network = body.network if isinstance(body, OpenPoseBody) else body
    device = body.device if isinstance(body, OpenPoseBody) else "cpu"
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None], np.float32) / 256 - 0.5)
    with torch.no_grad():
        pafs, heatmaps = network(x.to(device))

    def to_photo(maps) -> np.ndarray:
        import cv2  # here, not at import: the CLI builds its parser without it

        maps = maps[0].float().cpu().numpy().transpose(1, 2, 0)
        maps = cv2.resize(maps, None, fx=8, fy=8, interpolation=cv2.INTER_CUBIC)[:sh, :sw]
        return np.stack([cv2.resize(maps[..., c], (width, height), interpolation=cv2.INTER_CUBIC) for c in range(maps.shape[-1])], -1)  # fmt: skip

    heat, paf = to_photo(heatmaps), to_photo(pafs)
    peaks = []  # per part: (n, 3) x, y, score
    for part in range(18):
        blurred = cv2.GaussianBlur(heat[..., part], (0, 0), 3, borderType=cv2.BORDER_CONSTANT)
        cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        found = (blurred >= cv2.dilate(blurred, cross)) & (blurred > peak_threshold)
        ys, xs = np.nonzero(found)
        peaks.append(np.stack([xs, ys, heat[ys, xs, part]], 1) if len(xs) else np.zeros((0, 3)))

    # Limbs: every pair of candidate ends scored by the PAF along the segment; greedy one-to-one matching.
    people: list[dict] = []  # {"parts": {part: peak index}, "score": float}
    for (a, b), (cx, cy) in zip(_POSE_LIMBS, _POSE_PAF, strict=True):
        scored = []
        for i, pa in enumerate(peaks[a]):
            for j, pb in enumerate(peaks[b]):
                vec = pb[:2] - pa[:2]
                norm = max(float(np.hypot(*vec)), 1e-3)
                t = np.linspace(0, 1, 10)[:, None]
                xs, ys = np.rint(pa[:2] + t * vec).astype(int).T
                along = (paf[ys, xs, cx] * vec[0] + paf[ys, xs, cy] * vec[1]) / norm
                score = along.mean() + min(0.5 * height / norm - 1, 0)
                if (along > paf_threshold).sum() > 8 and score > 0:
                    scored.append((score, i, j))
        used_a, used_b = set(), set()
        for score, i, j in sorted(scored, reverse=True):
            if i in used_a or j in used_b:
                continue
            used_a.add(i), used_b.add(j)
            owners = [p for p in people if p["parts"].get(a) == i or p["parts"].get(b) == j]
            if not owners:
                people.append({"parts": {a: i, b: j}, "score": score + peaks[a][i, 2] + peaks[b][j, 2]})
                continue
            person = owners[0]
            for other in owners[1:]:  # the limb joins two partial people: merge them when they do not clash
                if not set(other["parts"]) & set(person["parts"]):
                    person["parts"].update(other["parts"])
                    person["score"] += other["score"]
                    people.remove(other)
            if b not in person["parts"]:
                person["parts"][b] = j
                person["score"] += peaks[b][j, 2]
            person["score"] += score

    found = []
    for person in people:
        parts = person["parts"]
        if len(parts) < 4 or person["score"] / len(parts) < 0.4:
            continue
        points = np.full((18, 2), np.nan)
        for part, index in parts.items():
            points[part] = peaks[part][index, :2]
        found.append(points)
    return found


# ----------------------------------------------------------------------------------------------- depth


def _depth_pipeline(model, device):
    """transformers' depth-estimation pipeline: ``model`` itself when it is one (load it once with
    ``transformers.pipeline("depth-estimation", ...)`` to make many images), else loaded from a name or
    folder; the default :data:`DEPTH_MODEL` is fetched and checked first."""
    if callable(model):
        return model
    from transformers import pipeline

    revision = None
    if model is None:
        from .hub import fetch

        fetch(DEPTH_MODEL)  # the weights, checked against their sha256; the pipeline reads the same commit
        model, revision = DEPTH_MODEL.repo, DEPTH_MODEL.revision
    try:
        return pipeline("depth-estimation", model=str(model), revision=revision, device=device or "cpu")
    except (OSError, ValueError) as exc:
        from .hub import model_not_found

        raise model_not_found(str(model), exc) from exc
