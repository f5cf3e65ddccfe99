"""PuLID's face side: an analysed face -> ``PuLIDFace`` (what the ID encoder reads), EVA02-CLIP-L and BiSeNet.

The authors' ``get_id_embedding`` (``pulid/pipeline_v1_1.py``; the FLUX pipeline's is the same): the raw
antelopev2 embedding of the face; the face aligned to the FFHQ 5-point template at 512x512 (facexlib's
``FaceRestoreHelper``; here ``faceid.faces.align.align_ffhq``, kept by face analysis as ``Face.crop_ffhq``);
BiSeNet parses the crop and every background label turns white, the rest the crop's gray; bicubic resize to the EVA tower's size, EVA-CLIP's mean/std; then EVA02-CLIP-L-14-336's visual tower gives its
projected CLS token and 5 hidden states. Both PuLID v1.1 (SDXL) and PuLID-FLUX read the same ``PuLIDFace``.

Differences from the authors, on purpose:

* **Keypoints.** The authors align with facexlib's RetinaFace landmarks, found again on the photo; here the 5
  landmarks of faceid's face analysis (antelopev2's SCRFD, the detector that found the face) align it: one
  detector, one face. The two detectors place the points a little differently, so the crops differ slightly.
* **EVA02-CLIP-L is a compact module of this file**, not timm's ``Eva``: timm imports torchvision, and the
  torchvision wheels the package registry has are built for CUDA torch (its ops fail to load next to the CPU torch
  this project tests on). ``EVAVisionTower`` is the authors' tower (rotary embeddings, SwiGLU with sub-LayerNorm,
  a CLS head), checked against their ``eva_clip`` code on tiny random weights (``tests/test_pulid_face.py``).
* **BiSeNet is a compact module of this file**, not facexlib (unmaintained; it pulls numba, filterpy and
  opencv-python besides torchvision for two small networks): the same layers under facexlib's names, so
  ``parsing_bisenet.pth`` loads strictly; checked against facexlib's code on seeded random weights.
* torchvision's tensor ``resize`` (bicubic, antialiased) is ``F.interpolate(..., "bicubic", antialias=True)``,
  which is what torchvision calls.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, FaceIDError

EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_FILE = "parsing_bisenet.pth"

EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_STD = (0.26862954, 0.26130258, 0.27577711)
"""EVA-CLIP's pixel normalisation (OpenAI CLIP's; the authors' ``eva_transform_mean/std``)."""
PARSING_MEAN = (0.485, 0.456, 0.406)
PARSING_STD = (0.229, 0.224, 0.225)
"""ImageNet's, what the authors normalise BiSeNet's input with."""


@dataclass(frozen=True)
class PuLIDFace:
    """What PuLID's encoder reads from one photo of a face (``faceid.methods.pulid_face.PuLIDFaceEncoder``).

    ``antelopev2``: the raw (not normalised) 512-d embedding of antelopev2's ``glintr100`` (insightface
    ``face['embedding']``), shape (512,) or (1, 512). ``eva_projection``: EVA02-CLIP-L-14-336's projection output
    (1, 768), before any normalisation. ``eva_hidden``: its 5 hidden states (``return_hidden=True``), each
    (1, tokens, 1024).
    """

    antelopev2: torch.Tensor
    eva_projection: torch.Tensor
    eva_hidden: tuple[torch.Tensor, ...]


def _tensor(state: dict[str, torch.Tensor], key: str, label: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{label} lacks the key {key!r}: it is not a complete released PuLID file")
    return state[key]


def _count(state: dict[str, torch.Tensor], prefix: str, separator: str = ".") -> int:
    """How many numbered entries ``{prefix}{separator}{i}.*`` there are, counting 0, 1, ... up to the first gap."""
    count = 0
    while any(key.startswith(f"{prefix}{separator}{count}.") for key in state):
        count += 1
    return count


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Load ``state`` into ``module``, refusing any missing, extra or misshapen key by name."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(map(repr, missing[:8]))}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"unexpected key(s) {', '.join(map(repr, unexpected[:8]))}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise CheckpointError(f"{label} does not have the released PuLID layout: {'; '.join(parts)}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{label}: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)} "
                "(a file made for another model size?)"
            )
    module.load_state_dict(state, strict=True)


EVA_HEAD_WIDTH = 64
"""EVA02-CLIP-L's head width (``head_width`` of its config): heads = width / 64; no tensor shape shows it."""
EVA_ROPE_TRAINED_GRID = 16
"""``pt_hw_seq_len``: the rotary embedding's grid at pretraining (224 / 14), interpolated to the tower's grid."""
EVA_NORM_EPS = 1e-6
EVA_HIDDEN_EVERY = 4
EVA_HIDDEN_LAST = 20
"""The hidden states PuLID reads: the inputs of blocks 4, 8, 12, 16 and 20 (``0 < i <= 20 and i % 4 == 0``)."""

PARSING_CLASSES = 19
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
"""The parsing labels PuLID whitens: background, cloth, hat, ears, earring, neck, necklace (the face stays)."""


# ----------------------------------------------------------------------------------------------------------------
# EVA02-CLIP-L visual tower
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EVAVisionConfig:
    """The tower's sizes (released EVA02-CLIP-L-14-336: 336 px, patch 14, width 1024, 24 blocks, 16 heads,
    SwiGLU hidden 2730, projection 768)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    embed_dim: int
    rope_trained_grid: int = EVA_ROPE_TRAINED_GRID

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], label: str = "the EVA-CLIP tower") -> EVAVisionConfig:
        width = _tensor(state, "cls_token", label).shape[-1]
        patch = _tensor(state, "patch_embed.proj.weight", label).shape[-1]
        grid = math.isqrt(_tensor(state, "pos_embed", label).shape[1] - 1)
        return cls(
            image_size=grid * patch,
            patch_size=patch,
            width=width,
            depth=_count(state, "blocks"),
            heads=width // EVA_HEAD_WIDTH,
            mlp_hidden=_tensor(state, "blocks.0.mlp.w1.weight", label).shape[0],
            embed_dim=_tensor(state, "head.weight", label).shape[0],
        )


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the rotation of interleaved pairs EVA's rope uses."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class EVARotary(nn.Module):
    """EVA02's 2-d rotary embedding of the patch tokens (``VisionRotaryEmbeddingFast``): half of each head's
    channels rotate with the token's row, half with its column, at frequencies of the pretraining grid
    interpolated to this one. Computed, not loaded (the released file's copies are ignored)."""

    def __init__(self, head_dim: int, grid: int, trained_grid: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        positions = torch.arange(grid) / grid * trained_grid
        freqs = torch.einsum("i,f->if", positions, freqs).repeat_interleave(2, dim=-1)  # (grid, half)
        rows = freqs[:, None, :].expand(grid, grid, half)
        cols = freqs[None, :, :].expand(grid, grid, half)
        freqs = torch.cat((rows, cols), dim=-1).reshape(grid * grid, -1)
        self.register_buffer("freqs_cos", freqs.cos(), persistent=False)
        self.register_buffer("freqs_sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + _rotate_pairs(x) * self.freqs_sin


class EVAAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=EVA_NORM_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: EVARotary) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        # The rotation acts on the patch tokens; the CLS token (first) keeps its own.
        q = torch.cat((q[:, :, :1], rope(q[:, :, 1:])), dim=2).type_as(v)
        k = torch.cat((k[:, :, :1], rope(k[:, :, 1:])), dim=2).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(self.inner_attn_ln(x))


class EVASwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EVA_NORM_EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVABlock(nn.Module):
    def __init__(self, config: EVAVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=EVA_NORM_EPS)
        self.attn = EVAAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=EVA_NORM_EPS)
        self.mlp = EVASwiGLU(config.width, config.mlp_hidden)

    def forward(self, x: torch.Tensor, rope: EVARotary) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class EVAVisionTower(nn.Module):
    """EVA02-CLIP's visual tower under the released key names (``visual.*`` of the EVA-CLIP file, prefix off).

    ``forward(pixels)`` -> ``(projection, hidden)``: the head's projection of the final-normed CLS token (not
    normalised) and the hidden states PuLID reads (the inputs of blocks 4, 8, ..., 20), as the authors'
    ``visual(x, return_all_features=False, return_hidden=True, shuffle=False)``.
    """

    def __init__(self, config: EVAVisionConfig):
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, config.width))
        self.rope = EVARotary(config.width // config.heads, grid, config.rope_trained_grid)
        self.blocks = nn.ModuleList(EVABlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=EVA_NORM_EPS)
        self.head = nn.Linear(config.width, config.embed_dim)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], label: str = EVA_CLIP_FILE) -> EVAVisionTower:
        """The tower of an EVA-CLIP state dict: the whole model's (``visual.*``, the text tower and
        ``logit_scale`` are left out) or the visual tower's alone; strictly, but for the rotary tables, which are
        computed."""
        if any(key.startswith("visual.") for key in state):
            state = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
        state = {key: value for key, value in state.items() if "rope.freqs_" not in key}
        tower = cls(EVAVisionConfig.from_state_dict(state, label))
        _load_exactly(tower, state, label)
        return tower

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EVAVisionTower:
        return cls.from_state_dict(_torch_file(path, "EVA-CLIP", "model", "module", "state_dict"), Path(path).name)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden = []
        for index, block in enumerate(self.blocks):
            if 0 < index <= EVA_HIDDEN_LAST and index % EVA_HIDDEN_EVERY == 0:
                hidden.append(x)
            x = block(x, self.rope)
        return self.head(self.norm(x)[:, 0]), hidden


# ----------------------------------------------------------------------------------------------------------------
# BiSeNet face parsing (facexlib's parsing_bisenet.pth)
# ----------------------------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    def __init__(self, base: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        widths = [(base, base, 1), (base, 2 * base, 2), (2 * base, 4 * base, 2), (4 * base, 8 * base, 2)]
        for i, (cin, cout, stride) in enumerate(widths, start=1):
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))


class ContextPath(nn.Module):
    def __init__(self, base: int = 64):
        super().__init__()
        self.resnet = ResNet18(base)
        self.arm16 = AttentionRefinement(4 * base, 2 * base)
        self.arm32 = AttentionRefinement(8 * base, 2 * base)
        self.conv_head32 = ConvBNReLU(2 * base, 2 * base)
        self.conv_head16 = ConvBNReLU(2 * base, 2 * base)
        self.conv_avg = ConvBNReLU(8 * base, 2 * base, kernel=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean((2, 3), keepdim=True))
        feat32 = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(feat32, feat16.shape[2:], mode="nearest"))
        feat16 = self.arm16(feat16) + up32
        up16 = self.conv_head16(F.interpolate(feat16, feat8.shape[2:], mode="nearest"))
        return feat8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat((spatial, context), dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * attention + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """facexlib's face-parsing BiSeNet (ResNet-18 context path, 19 classes) under its key names.
    ``forward`` gives the main head's logits at the input's size (facexlib's ``out``; PuLID reads only that).
    Every width is a multiple of ``base`` (facexlib's: 64), which ``from_file`` reads off the file, as the class
    count; the tests' tiny one is narrower."""

    def __init__(self, classes: int = PARSING_CLASSES, base: int = 64):
        super().__init__()
        self.cp = ContextPath(base)
        self.ffm = FeatureFusion(4 * base, 4 * base)
        self.conv_out = BiSeNetOutput(4 * base, 4 * base, classes)
        # The auxiliary heads of training: in the released file, never read at inference.
        self.conv_out16 = BiSeNetOutput(2 * base, base, classes)
        self.conv_out32 = BiSeNetOutput(2 * base, base, classes)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BiSeNet:
        state = _torch_file(path, "face parsing")
        # BatchNorm's step counters are bookkeeping of training, saved by some torch versions and not others.
        state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
        label = Path(path).name
        base = _tensor(state, "cp.resnet.conv1.weight", label).shape[0]
        net = cls(_tensor(state, "conv_out.conv_out.weight", label).shape[0], base)
        expected = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        _load_exactly(_Keys(expected), state, label)
        net.load_state_dict(state, strict=False)
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, up16, _ = self.cp(x)
        out = self.conv_out(self.ffm(feat8, up16))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


class _Keys(nn.Module):
    """A stand-in whose state dict is ``expected``: lets ``_load_exactly`` check names and shapes."""

    def __init__(self, expected: dict[str, torch.Tensor]):
        super().__init__()
        self._expected = expected

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._expected

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return None


def _torch_file(path: str | os.PathLike, what: str, *wrappers: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, read with ``weights_only=True`` (no code runs); unwrapped from ``wrappers``
    keys and a ``module.`` prefix (DataParallel) where the file has them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} ({type(exc).__name__}: {str(exc)[:300]}); is it the released {what} file, complete?"
        ) from exc
    for key in wrappers:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no state dict: it is not the released {what} file")
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


# ----------------------------------------------------------------------------------------------------------------
# Photo -> PuLIDFace
# ----------------------------------------------------------------------------------------------------------------


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def face_features_image(crop: torch.Tensor, parser: nn.Module) -> torch.Tensor:
    """The aligned crop (1, 3, H, W) RGB in [0, 1] with what is not face white and the face in gray (the luma
    0.299 R + 0.587 G + 0.114 B in all three channels): what EVA sees, so that it reads the face alone."""
    labels = parser(_normalise(crop, PARSING_MEAN, PARSING_STD)).argmax(dim=1, keepdim=True)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        background |= labels == label
    gray = (0.299 * crop[:, 0:1] + 0.587 * crop[:, 1:2] + 0.114 * crop[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(background, torch.ones_like(crop), gray)


def eva_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] -> the tower's input: bicubic (antialiased) to ``size``, EVA-CLIP's mean/std."""
    image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return _normalise(image, EVA_MEAN, EVA_STD)


class PuLIDFaceEncoder(nn.Module):
    """An analysed face -> ``PuLIDFace``, with the EVA tower and BiSeNet loaded once (read-only: calls from
    several threads share it). ``PuLIDFaceEncoder.from_files(EVA_PT, PARSING_PTH)``."""

    def __init__(self, eva: EVAVisionTower, parser: BiSeNet):
        super().__init__()
        self.eva = eva.eval().requires_grad_(False)
        self.parser = parser.eval().requires_grad_(False)

    @classmethod
    def from_files(cls, eva_clip: str | os.PathLike, parsing: str | os.PathLike) -> PuLIDFaceEncoder:
        return cls(EVAVisionTower.from_file(eva_clip), BiSeNet.from_file(parsing))

    @torch.no_grad()
    def eva_features(self, crop_rgb: np.ndarray) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """EVA's projection (1, E) and hidden states of an FFHQ-aligned crop (H x W x 3 uint8 RGB)."""
        param = next(self.eva.parameters())
        crop = torch.from_numpy(np.ascontiguousarray(crop_rgb)).permute(2, 0, 1)[None].to(param.device, param.dtype)
        features = face_features_image(crop / 255.0, self.parser)
        projection, hidden = self.eva(eva_pixels(features, self.eva.image_size))
        return projection, tuple(hidden)

    def forward(self, face: Any) -> PuLIDFace:
        """``face``: a ``Face`` analysed with antelopev2 (its raw embedding and its ``crop_ffhq``)."""
        if getattr(face, "crop_ffhq", None) is None:
            raise FaceIDError(
                "PuLID reads the face aligned at 512 (Face.crop_ffhq), which face analysis keeps when it runs "
                "antelopev2's recognizer: analyse the photo with such an analyzer (the pipeline's, once PuLID is "
                "loaded), or give the photo"
            )
        projection, hidden = self.eva_features(face.crop_ffhq)
        antelopev2 = torch.as_tensor(
            np.asarray(face.embedding_for("antelopev2", normalised=False)), dtype=torch.float32
        )
        return PuLIDFace(antelopev2=antelopev2.reshape(1, -1), eva_projection=projection, eva_hidden=hidden)
