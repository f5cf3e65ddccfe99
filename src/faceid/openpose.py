"""OpenPose's body network and its decoding into people: a photo -> the 18 body keypoints of each person.

The network is the one ControlNet's pose annotator runs (``body_pose_model.pth`` of ``lllyasviel/Annotators``,
CMU's COCO body model converted to torch). It is written here on torch (a plain VGG/CPM stack) rather than
taken from ``controlnet_aux``: that package imports torchvision, timm and einops at import time, and installing
torchvision switches transformers' CLIP image processor to another backend, which would change faceid's
identity inputs. The keypoint association is a simplification of OpenPose's: part-affinity-scored limbs,
matched greedily, joined into people. ``faceid.control`` draws the people found as a pose control image.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import CheckpointError, MissingWeightsError
from .hub import HubFile, fetch

__all__ = [
    "COLORS",
    "DETECT_RESOLUTION",
    "LIMBS",
    "OPENPOSE_BODY",
    "PAF_CHANNELS",
    "OpenPoseBody",
    "detect_people",
    "openpose_people",
]

#: The OpenPose body weights ControlNet's annotators use (CMU's COCO body model, converted to torch), pinned to
#: commit 83cbccd ("Upload RealESRGAN_x4plus.pth") of lllyasviel/Annotators; the file itself came with 733558a
#: ("Upload 7 files") and never changed. The sha256 and size are its Git LFS pointer, the same in every copy.
OPENPOSE_BODY = HubFile(
    "lllyasviel/Annotators",
    "body_pose_model.pth",
    revision="83cbccd4a3be9fa9f2fd9fe96f30288c9762e65b",
    sha256="25a948c16078b0f08e236bda51a385d855ef4c153598947c28c0d47ed94bb746",
    size=209267595,
)

# OpenPose (COCO 18: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip, r-knee,
# r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear). The first 17 limbs are drawn (the ear-shoulder
# ones only help association); limb i and keypoint i share colour i.
LIMBS = [
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
]  # fmt: skip
# The two PAF channels (x, y) of each limb, in the order above.
PAF_CHANNELS = [
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
]  # fmt: skip
COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip

# The network reads the photo at one scale, 184 px tall (0.5 x OpenPose's 368 px box), as ControlNet's annotator
# runs it, whatever the photo's size.
NETWORK_HEIGHT = 0.5 * 368

#: The longest side of the copy of a photo that :func:`detect_people` decodes OpenPose's maps at. ControlNet's
#: annotators (controlnet_aux's ``detect_resolution``) bring the shorter side to 512; the longer side here bounds
#: the memory whatever the photo's shape. The decoding holds 57 float32 maps at that size and peaks near 380
#: bytes a pixel: at a 50-megapixel photo's own size that would be some 19 GB.
DETECT_RESOLUTION = 512


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


def detect_people(
    body: OpenPoseBody | Callable, photo: Image.Image, detect_resolution: int = DETECT_RESOLUTION
) -> list[np.ndarray]:
    """The people OpenPose finds in ``photo`` (an RGB PIL image), in the photo's pixel coordinates (as
    :func:`openpose_people`), found on a copy at most ``detect_resolution`` on its longest side.

    The copy is never larger than the photo, and never less tall than the 184 px the network reads (a very
    wide photo keeps that much of its height), so the network reads the person at the size it would from the
    full photo; only the decoding runs at the copy's size, which bounds its memory whatever the photo's size.
    Keypoints are mapped back pixel centre to pixel centre: each lands within about one pixel of the copy of
    where decoding the full photo puts it.
    """
    width, height = photo.size
    scale = min(1.0, detect_resolution / max(width, height))
    scale = max(scale, min(1.0, NETWORK_HEIGHT / height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Area averaging, like the annotators' cv2.INTER_AREA, and no copy at all when the photo is small enough.
    copy = photo if size == photo.size else photo.resize(size, Image.Resampling.BOX)
    people = openpose_people(body, np.asarray(copy))
    to_photo = np.array([width / size[0], height / size[1]])
    return [(points + 0.5) * to_photo - 0.5 for points in people]  # NaN stays NaN


def openpose_people(
    body: OpenPoseBody | Callable, rgb: np.ndarray, *, peak_threshold: float = 0.1, paf_threshold: float = 0.05
) -> list[np.ndarray]:
    """The people OpenPose finds in ``rgb`` (HxWx3 uint8): one (18, 2) array of pixel (x, y) each, NaN for a
    keypoint not found. As ControlNet's annotator runs it: one scale (the photo 184 px tall), BGR input in
    [-0.5, 0.5), heatmap peaks above ``peak_threshold`` after a Gaussian blur (sigma 3), limbs scored along
    their part affinity field; people with fewer than 4 parts or a mean score under 0.4 are dropped.

    The maps are decoded at ``rgb``'s own size (near 380 bytes a pixel at the peak): give a photo as
    :func:`detect_people` does, at detection resolution."""
    import cv2  # here, not at import: the CLI builds its parser without it
    import torch

    height, width = rgb.shape[:2]
    scale = NETWORK_HEIGHT / height
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
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS, strict=True):
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
