"""Make the PuLID face-side reference arrays (``reference.npz``) with the authors' own code.

What runs: PuLID's ``eva_clip`` package (github:ToTheBeginning/PuLID at commit 1aa2fc7d: ``eva_clip/model.py``'s
``_build_vision_tower`` from ``model_configs/EVA02-CLIP-L-14-336.json``, with ``eva_vit_model.py`` and ``rope.py``)
and facexlib's ``BiSeNet`` (github:xinntao/facexlib: ``facexlib/parsing/bisenet.py``, ``resnet.py``) and its
``FaceRestoreHelper`` alignment (``face_template`` and ``align_warp_face``, replayed: the class pulls in the
detectors), at **tiny random weights**:

* EVA: the released config with image_size 28 (2x2 patches of 14), width 64 (one head of the released 64), 21 blocks
  (the fewest that give PuLID's 5 hidden states, the inputs of blocks 4..20), projection 32; the rest (rope,
  SwiGLU + sub-LN, qkv bias, CLS pooling, eps 1e-6) as released; weights drawn by ``seeded_state`` from seed 1
  over its tensors but the rotary tables (the test draws the same ones under faceid's names, which must be the
  authors' for that).
* BiSeNet: the released sizes (its widths are fixed), weights drawn by ``seeded_state`` below from seed 0 in key
  order (the test draws the same ones: 50 MB are not stored); run on a 32x32 input.
* Alignment: a 96x80 random photo, 5 landmarks, warped to 64 (template scaled, as ``face_size=64``).

Neither needs torchvision, timm, xformers or apex at these points: stand-in modules let the authors' files import
(``timm.models.layers``' init helpers, ``torchvision.ops.misc.FrozenBatchNorm2d``, unused here). einops is needed
(``pip install --target DIR einops`` and put DIR on PYTHONPATH).

Run (fp32, one thread, ~5 s):

    git --git-dir=<mirror of ToTheBeginning/PuLID> archive HEAD eva_clip | tar -x -C $PULID_REPO
    git --git-dir=<mirror of xinntao/facexlib> archive HEAD facexlib/parsing | tar -x -C $FACEXLIB_REPO
    PULID_REPO=... FACEXLIB_REPO=... python tests/data/pulid_face/make.py
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def seeded_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for a module's state dict, in sorted key order from one generator: normal / sqrt(fan-in)
    for matrices and kernels, normal * 0.1 for vectors (BatchNorm running variances |.| + 0.5, norm scales
    1 + ...), step counters 0: activations stay of order 1 through a deep network."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) >= 2 else 100
        value = torch.randn(shape, generator=generator) / fan_in**0.5
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # norm scales
            value = value + 1.0
        state[key] = value
    return state


def _stubs() -> None:
    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    layers = types.ModuleType("timm.models.layers")
    layers.trunc_normal_ = trunc_normal_
    layers.drop_path = lambda x, *a, **k: x
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm.models, timm_models.layers = timm_models, layers
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc
    tv = types.ModuleType("torchvision")
    tv.ops = ops
    sys.modules.update(
        {"timm": timm, "timm.models": timm_models, "timm.models.layers": layers, "timm.layers": layers,
         "torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
    )  # fmt: skip


def _package(name: str, folder: Path) -> None:
    """``name`` importable from ``folder`` without running its ``__init__`` (which imports the whole stack)."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package


def eva_reference(pulid: Path, out: dict) -> None:
    _package("eva_clip", pulid / "eva_clip")
    model = importlib.import_module("eva_clip.model")
    config = json.loads((pulid / "eva_clip/model_configs/EVA02-CLIP-L-14-336.json").read_text())
    vision = dict(config["vision_cfg"], image_size=28, width=64, layers=21)
    tower = model._build_vision_tower(embed_dim=32, vision_cfg=vision).eval()
    # Seeded weights for every tensor but the rotary tables (computed, not weights): the constant inits
    # (LayerNorm 1/0, q/v bias 0) get noise too, so a missed one shows.
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items() if "rope.freqs_" not in k}
    tower.load_state_dict(seeded_state(shapes, seed=1), strict=False)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        projection, hidden = tower(pixels, return_all_features=False, return_hidden=True, shuffle=False)
    out["eva_pixels"] = pixels.numpy()
    out["eva_projection"] = projection.numpy()
    for i, h in enumerate(hidden):
        out[f"eva_hidden_{i}"] = h.numpy()


def bisenet_reference(facexlib: Path, out: dict) -> None:
    _package("facexlib", facexlib / "facexlib")
    _package("facexlib.parsing", facexlib / "facexlib/parsing")
    bisenet = importlib.import_module("facexlib.parsing.bisenet")
    net = bisenet.BiSeNet(num_class=19).eval()
    net.load_state_dict(seeded_state({k: tuple(v.shape) for k, v in net.state_dict().items()}))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = net(x)[0]
    out["bisenet_input"] = x.numpy()
    out["bisenet_logits"] = logits.numpy()


def align_reference(out: dict) -> None:
    """facexlib's ``FaceRestoreHelper(face_size=64, crop_ratio=(1, 1))`` template and ``align_warp_face``."""
    import cv2

    rng = np.random.default_rng(4)
    photo = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    landmarks = np.array([[30.2, 40.1], [52.7, 39.5], [41.3, 52.2], [32.9, 63.8], [50.4, 64.1]])
    template = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]]) * (64 / 512.0)  # fmt: skip
    matrix = cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)[0]
    bgr = cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)  # the authors warp the BGR image
    crop = cv2.warpAffine(bgr, matrix, (64, 64), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
    out["align_photo"] = photo
    out["align_landmarks"] = landmarks
    out["align_crop"] = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)


def main() -> None:
    torch.set_num_threads(1)
    _stubs()
    out: dict = {}
    eva_reference(Path(os.environ["PULID_REPO"]), out)
    bisenet_reference(Path(os.environ["FACEXLIB_REPO"]), out)
    align_reference(out)
    np.savez_compressed(HERE / "reference.npz", **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
