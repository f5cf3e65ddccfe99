"""The tests' own tiny models (tiny_models.py): the golden models' shapes, a valid CLIP BPE tokenizer that the
text encoders agree with, adapters whose every part acts, and builds that are the same every time."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ADAPTERS, TinyModels

PROMPTS = ["a photo of a person in a garden", "a photo of alice", "a photo of bob", "an oil painting of a man"]


def _config(folder, part):
    return json.loads((folder / part / "config.json").read_text())


def test_tokenizer_is_a_working_clip_bpe(tiny_models):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.tokenizer)
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert all(i[0] == tokenizer.bos_token_id and i[-1] == tokenizer.eos_token_id for i in ids)
    assert len({tuple(i) for i in ids}) == len(PROMPTS)  # different prompts, different ids
    assert all(len(i) - 2 < len(p.split()) * 2 for i, p in zip(ids, PROMPTS, strict=True))  # merges: words, not bytes
    assert [tokenizer.decode(i, skip_special_tokens=True) for i in ids] == PROMPTS
    # Any text tokenizes without unknown tokens (byte fallback): accents, symbols, digits, upper case.
    odd = tokenizer("Zürich ☃ 3D, 42!").input_ids[1:-1]
    assert odd and tokenizer.unk_token_id not in odd
    padded = tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids
    assert {len(p) for p in padded} == {77} and padded[0][-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert CLIPTokenizer.from_pretrained(tiny_models.sdxl / "tokenizer_2").pad_token == "!"


def test_text_encoders_agree_with_the_tokenizer(tiny_models):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.tokenizer)
    for folder, part in ((tiny_models.sd15, "text_encoder"), (tiny_models.sdxl, "text_encoder_2")):
        config = _config(folder, part)
        assert config["vocab_size"] == len(tokenizer)
        assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_models_have_the_golden_shapes(tiny_models):
    """The numbers FORMAT.md gives the golden folder's models."""
    unet = _config(tiny_models.sd15, "unet")
    assert unet["block_out_channels"] == [32, 64] and unet["cross_attention_dim"] == 64
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"] and unet["sample_size"] == 8
    assert unet["layers_per_block"] == 1 and unet["attention_head_dim"] == 8
    xl = _config(tiny_models.sdxl, "unet")
    assert xl["cross_attention_dim"] == 128 and xl["transformer_layers_per_block"] == [1, 2]
    assert (
        xl["addition_embed_type"] == "text_time" and xl["addition_time_embed_dim"] == 8 and xl["use_linear_projection"]
    )
    text, text_2 = _config(tiny_models.sd15, "text_encoder"), _config(tiny_models.sdxl, "text_encoder_2")
    assert (text["hidden_size"], text["num_hidden_layers"], text["max_position_embeddings"]) == (64, 2, 77)
    assert (text_2["hidden_size"], text_2["num_hidden_layers"], text_2["projection_dim"]) == (64, 3, 32)
    assert _config(tiny_models.sd15, "vae")["scaling_factor"] == 0.18215
    for folder in (tiny_models.sd15, tiny_models.sdxl):
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
        assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"]) == (0.00085, 0.012, 1)
        assert not scheduler["clip_sample"] and not scheduler["set_alpha_to_one"]
    assert json.loads((tiny_models.sd15 / "model_index.json").read_text())["safety_checker"] == [None, None]
    vision = json.loads((tiny_models.image_encoder / "config.json").read_text())
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (224, 32, 48)


@pytest.mark.parametrize("variant", sorted(ADAPTERS))
def test_every_part_of_each_adapter_acts(tiny_models, variant):
    from faceid.checkpoints import load_state_dict

    state = load_state_dict(tiny_models.adapter(variant, "safetensors"))
    ups = [v for k, v in state["ip_adapter"].items() if k.endswith("_lora.up.weight")]
    assert bool(ups) == (ADAPTERS[variant][2] is not None)
    assert all(v.abs().max() > 0 for v in ups)  # initialised at zero, randomised here: the LoRA acts
    assert not torch.equal(state["image_proj"]["norm.weight"], torch.ones_like(state["image_proj"]["norm.weight"]))


def test_builds_are_the_same_every_time(tiny_models, tmp_path):
    from faceid.checkpoints import load_state_dict

    again = TinyModels(tmp_path)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/merges.txt"):
        assert (again.sd15 / name).read_bytes() == (tiny_models.sd15 / name).read_bytes(), name
    assert again.adapter("faceid").read_bytes() == tiny_models.adapter("faceid").read_bytes()  # .safetensors
    # .bin: torch.save names its zip records after the (temporary) file name, so compare the tensors
    ours, theirs = (load_state_dict(m.adapter("faceid", "bin")) for m in (again, tiny_models))
    assert all(torch.equal(v, theirs[g][k]) for g in ours for k, v in ours[g].items())
