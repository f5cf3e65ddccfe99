"""PuLID's face side (``faceid.methods.pulid_face``, ``faceid.faces.align.align_ffhq``) against the authors' code.

``tests/data/pulid_face/reference.npz`` was made by ``tests/data/pulid_face/make.py`` running PuLID's own
``eva_clip`` (a tiny EVA02-CLIP-L-14-336 tower: the released config at image 28, width 64, 21 blocks) and facexlib's
``BiSeNet`` and ``FaceRestoreHelper`` alignment, on weights drawn by ``make.seeded_state``; the same draw here, under
faceid's module names, gives the same numbers (fp32, within 1e-5 of each array's magnitude). Also checked: the
released layouts load strictly (a key missing or renamed is a ``CheckpointError`` naming it; the EVA-CLIP file's
text tower and rotary tables are left out, BatchNorm step counters are optional), what EVA sees of a parsed crop
(background labels white, the face gray), and the encoder's output on a face.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from faceid.errors import CheckpointError, FaceIDError
from faceid.faces.align import align_ffhq
from faceid.methods.pulid_face import (
    BACKGROUND_LABELS,
    BiSeNet,
    EVAVisionConfig,
    EVAVisionTower,
    PuLIDFaceEncoder,
    face_features_image,
)

DATA = Path(__file__).parent / "data" / "pulid_face"
sys.path.insert(0, str(DATA))
from make import seeded_state  # noqa: E402  (the reference's weight draw)

REFERENCE = np.load(DATA / "reference.npz")


def close(actual: torch.Tensor | np.ndarray, name: str) -> float:
    expected = REFERENCE[name]
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    assert actual.shape == expected.shape, f"{name}: {actual.shape} != {expected.shape}"
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
    assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol:.3g}"
    return diff


def _drawn(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    module.load_state_dict(seeded_state({k: tuple(v.shape) for k, v in module.state_dict().items()}, seed=seed))
    return module.eval()


def _tiny_eva_config() -> EVAVisionConfig:
    pixels, hidden = REFERENCE["eva_pixels"], REFERENCE["eva_hidden_0"]
    width, size = hidden.shape[-1], pixels.shape[-1]
    patch = int(size / (hidden.shape[1] - 1) ** 0.5)
    return EVAVisionConfig(
        image_size=size, patch_size=patch, width=width, depth=21, heads=1, mlp_hidden=int(width * 2.6667),
        embed_dim=REFERENCE["eva_projection"].shape[-1],
    )  # fmt: skip


@pytest.fixture(scope="module")
def eva() -> EVAVisionTower:
    return _drawn(EVAVisionTower(_tiny_eva_config()), seed=1)


def test_the_eva_tower_equals_the_authors(eva):
    with torch.no_grad():
        projection, hidden = eva(torch.from_numpy(REFERENCE["eva_pixels"]))
    close(projection, "eva_projection")
    assert len(hidden) == 5  # the inputs of blocks 4, 8, 12, 16, 20
    for i, h in enumerate(hidden):
        close(h, f"eva_hidden_{i}")


def test_bisenet_equals_facexlibs():
    net = _drawn(BiSeNet(), seed=0)
    with torch.no_grad():
        close(net(torch.from_numpy(REFERENCE["bisenet_input"])), "bisenet_logits")


def test_the_alignment_equals_facexlibs():
    size = REFERENCE["align_crop"].shape[0]
    crop = align_ffhq(REFERENCE["align_photo"], REFERENCE["align_landmarks"], size)
    np.testing.assert_array_equal(crop, REFERENCE["align_crop"])
    with pytest.raises(FaceIDError, match="degenerate"):
        align_ffhq(REFERENCE["align_photo"], np.zeros((5, 2)), size)


def test_the_released_layouts_load_strictly(eva, tmp_path):
    state = {f"visual.{k}": v for k, v in eva.state_dict().items()}
    state["visual.rope.freqs_cos"] = torch.zeros(4, 64)  # the authors' rotary tables: computed, ignored
    state["text.token_embedding.weight"] = torch.zeros(3, 4)  # the text tower: not the visual tower's
    torch.save(state, tmp_path / "eva.pt")
    loaded = EVAVisionTower.from_file(tmp_path / "eva.pt")
    assert loaded.config == eva.config
    for key, value in eva.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    broken = dict(state)
    broken["visual.blocks.3.attn.q_biass"] = broken.pop("visual.blocks.3.attn.q_bias")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) 'blocks.3.attn.q_bias'.*unexpected.*q_biass"):
        EVAVisionTower.from_file(tmp_path / "broken.pt")

    net = BiSeNet(base=8)
    torch.save(net.state_dict(), tmp_path / "parsing.pth")
    assert BiSeNet.from_file(tmp_path / "parsing.pth").cp.resnet.conv1.out_channels == 8
    without = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"module." + k: v for k, v in without.items()}, tmp_path / "parallel.pth")  # DataParallel's
    BiSeNet.from_file(tmp_path / "parallel.pth")
    del without["ffm.conv1.weight"]
    torch.save(without, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) 'ffm.conv1.weight'"):
        BiSeNet.from_file(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*junk.pth"):
        BiSeNet.from_file(tmp_path / "junk.pth")


class FixedLabels(torch.nn.Module):
    """A parser that labels the left half ``left`` and the right half ``right`` (as one-hot logits)."""

    def __init__(self, left: int, right: int):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        half = x.shape[-1] // 2
        logits[:, self.left, :, :half] = 1
        logits[:, self.right, :, half:] = 1
        return logits


@pytest.mark.parametrize("background", BACKGROUND_LABELS)
def test_what_eva_sees_is_the_face_in_gray_on_white(background):
    crop = torch.rand(1, 3, 8, 8)
    face = 1  # skin
    seen = face_features_image(crop, FixedLabels(face, background))
    gray = 0.299 * crop[:, 0] + 0.587 * crop[:, 1] + 0.114 * crop[:, 2]
    for channel in range(3):
        torch.testing.assert_close(seen[:, channel, :, :4], gray[:, :, :4])
    assert bool((seen[..., 4:] == 1).all())


def test_the_encoder_reads_an_analysed_face(eva):
    class Face:
        crop_ffhq = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        raw_embeddings = {"antelopev2": np.linspace(-3, 3, 512, dtype=np.float32)}

        def embedding_for(self, pack, normalised=True):
            return self.raw_embeddings[pack]

    encoder = PuLIDFaceEncoder(eva, BiSeNet(base=8))
    face = encoder(Face())
    assert face.antelopev2.shape == (1, 512) and float(face.antelopev2[0, -1]) == 3.0  # raw, not normalised
    assert face.eva_projection.shape == (1, eva.config.embed_dim) and len(face.eva_hidden) == 5
    again = encoder(Face())
    torch.testing.assert_close(again.eva_projection, face.eva_projection, rtol=0, atol=0)
    Face.crop_ffhq = None
    with pytest.raises(FaceIDError, match=r"Face.crop_ffhq"):
        encoder(Face())
