"""Record the arrays of ``tests/test_method_infiniteyou_generate.py``'s IR-SE50 check with facexlib's own code.

facexlib's ``Backbone(50, 0.6, "ir_se")`` (``facexlib/recognition/arcface_arch.py``, the network InfiniteYou's
``extract_arcface_bgr_embedding`` runs) built tiny (one bottleneck per stage: its ``get_blocks`` patched), filled
with :func:`fill` (deterministic values from each key's name and shape, which the test fills faceid's network with
too), run in eval mode on two random 112x112 crops fed as the authors feed it (BGR, ``2 * x / 255 - 1``).

    git --git-dir=$(fetch github:xinntao/facexlib) show HEAD:facexlib/recognition/arcface_arch.py > /tmp/x/arcface_arch.py
    python tests/data/infiniteyou_face/make_arrays.py /tmp/x

writes ``arrays.npz`` here: ``crops_rgb`` (2, 112, 112, 3) uint8 and ``embeddings`` (2, 512) float32.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import torch

TINY_UNITS = (1, 1, 1, 1)


def fill(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values for every tensor of an IR-SE state dict, from each key's name and shape alone: weights of fan-in
    scale, BatchNorm near identity (running variance 0.75..1.25), PReLU slopes near 0.25."""
    filled = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            filled[key] = tensor.clone()
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim >= 2:
            value = noise / float(np.sqrt(np.prod(tensor.shape[1:])))
        elif key.endswith("running_var"):
            value = 1.0 + 0.25 * torch.rand(tensor.shape, generator=generator) * 2 - 0.25
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * noise
        elif tensor.ndim == 1 and state.get(key.replace("weight", "running_var")) is not None:
            value = 1.0 + 0.1 * noise  # a BatchNorm's scale
        else:
            value = 0.25 + 0.05 * noise  # a PReLU's slopes
        filled[key] = value.to(tensor.dtype)
    return filled


def crops() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)


def main(facexlib_dir: str) -> None:
    sys.path.insert(0, facexlib_dir)
    import arcface_arch  # facexlib's file, as fetched

    arcface_arch.get_blocks = lambda num_layers: [
        arcface_arch.get_block(in_channel=i, depth=d, num_units=n)
        for i, d, n in zip((64, 64, 128, 256), (64, 128, 256, 512), TINY_UNITS, strict=True)
    ]
    model = arcface_arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    model.load_state_dict(fill(model.state_dict()), strict=True)
    model.eval()
    rgb = crops()
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        embeddings = model((2 * bgr - 1).contiguous()).numpy().astype(np.float32)  # as the authors: .contiguous()
    np.savez(Path(__file__).with_name("arrays.npz"), crops_rgb=rgb, embeddings=embeddings)
    print("embeddings", embeddings.shape, "norms", np.linalg.norm(embeddings, axis=1))


if __name__ == "__main__":
    main(sys.argv[1])
