"""ArcFace IR-SE50, the face recognizer InfiniteYou was trained on: facexlib's ``recognition_arcface_ir_se50.pth``.

InfiniteYou's authors embed a face with facexlib's ``init_recognition_model("arcface")`` (an IR-SE network of 50
layers, InsightFace_Pytorch's ``Backbone(50, mode="ir_se")``) on the 112x112 crop aligned by antelopev2's 5
keypoints, in BGR, scaled to [-1, 1]; the output is L2-normalised. This is that network written for faceid (facexlib
itself is unmaintained and pulls numba, filterpy and opencv-python), with the module names of the released file so
that it loads strictly: a missing, extra or misshapen key is a :class:`~faceid.errors.CheckpointError` naming it.

Layout (the names are the file's): ``input_layer`` (3x3 conv, BN, PReLU), ``body`` (24 bottlenecks in stages of
3, 4, 14, 3 units of widths 64, 128, 256, 512, the first of each stage strided; each ``res_layer`` is BN, conv,
PReLU, conv, BN, squeeze-excitation; ``shortcut_layer`` a 1x1 max-pool or a strided 1x1 conv + BN), and
``output_layer`` (BN, dropout, flatten, linear 512*7*7 -> 512, BN1d). ``IRSE50(units=...)`` builds smaller ones of
the same layout (the tests' tiny random network).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, FaceIDError

__all__ = ["IRSE50", "IRSE50_FILE", "IRSE50_UNITS", "load_irse50", "units_of"]

IRSE50_FILE = "recognition_arcface_ir_se50.pth"  # facexlib's release asset (v0.1.0), its name kept
IRSE50_UNITS = (3, 4, 14, 3)  # bottlenecks per stage of the 50-layer network
WIDTHS = (64, 128, 256, 512)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class _Bottleneck(nn.Module):
    """One IR-SE unit: ``res_layer(x) + shortcut_layer(x)``."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            _SqueezeExcite(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """The ArcFace IR-SE network (see the module): BGR crops in [-1, 1], (N, 3, 112, 112) -> (N, 512) unit
    vectors. ``units``: bottlenecks per stage (the 50-layer network's by default)."""

    def __init__(self, units: Sequence[int] = IRSE50_UNITS) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks = []
        in_channels = 64
        for depth, count in zip(WIDTHS, units, strict=True):
            for k in range(count):
                blocks.append(_Bottleneck(in_channels if k == 0 else depth, depth, 2 if k == 0 else 1))
            in_channels = depth
        self.body = nn.Sequential(*blocks)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(0.6), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)

    @torch.no_grad()
    def embed(self, aligned_rgb: np.ndarray) -> np.ndarray:
        """The embeddings of 112x112 aligned RGB crops (``Face.aligned``; (112, 112, 3) or (N, 112, 112, 3) uint8),
        read as the authors feed facexlib: BGR, ``2 * pixels / 255 - 1``. (N, 512) or (512,) float32."""
        crops = np.asarray(aligned_rgb)
        one = crops.ndim == 3
        crops = crops[None] if one else crops
        if crops.shape[1:] != (112, 112, 3):
            raise FaceIDError(f"IR-SE50 reads 112x112 aligned RGB face crops, got {crops.shape[1:]}")
        param = next(self.parameters())
        pixels = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(0, 3, 1, 2).float() / 255.0
        vectors = self(2 * pixels.to(param.device, param.dtype) - 1).float().cpu().numpy()
        return vectors[0] if one else vectors


def units_of(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The bottlenecks per stage of a state dict in this layout, read off the widths of its ``body`` units (the
    released file's are 3, 4, 14, 3)."""
    depths: dict[int, int] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "body" and parts[2:] == ["res_layer", "1", "weight"]:
            depths[int(parts[1])] = int(tensor.shape[0])
    counts = [sum(1 for d in depths.values() if d == width) for width in WIDTHS]
    return tuple(counts) if all(counts) else IRSE50_UNITS


def load_irse50(path: str | Path) -> IRSE50:
    """facexlib's ``recognition_arcface_ir_se50.pth`` (a plain state dict, read with ``weights_only=True``) in an
    :class:`IRSE50` of the units it holds (``units_of``), strictly, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: InfiniteYou's face recognizer is facexlib's {IRSE50_FILE} "
            "(https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path.name} is not a readable PyTorch state dict: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = IRSE50(units_of(state))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        said = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else ""]
        raise CheckpointError(
            f"{path.name} is not facexlib's ArcFace IR-SE50: {'; '.join(s for s in said if s)} (of "
            f"{len(missing)} missing and {len(extra)} unexpected keys)"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path.name}: {key!r} has shape {tuple(state[key].shape)}, IR-SE50 expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
