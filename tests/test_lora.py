"""LoRA files: the identity LoRA exported as the ecosystem's LoRA file, user LoRAs stacked next to it."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import make_tiny_unet
from safetensors import safe_open
from safetensors.torch import save_file

from faceid.adapter import FaceIDAdapter, initial_state_dict
from faceid.checkpoints import save_state_dict
from faceid.errors import CheckpointError
from faceid.lora import LoraStack, identity_lora_state_dict, save_lora

# Layers of the tiny UNet that the "style" LoRA adapts: attention projections of two transformer blocks,
# a feed-forward Linear and a 1x1 Conv (proj_in), like a typical A1111 LoRA.
STYLE_TARGETS = [
    *(
        f"down_blocks.0.attentions.0.transformer_blocks.0.{a}.{t}"
        for a in ("attn1", "attn2")
        for t in ("to_q", "to_k", "to_v", "to_out.0")
    ),
    *(f"up_blocks.1.attentions.1.transformer_blocks.0.attn2.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0")),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in",
]


def _half_exact(tensor: torch.Tensor) -> torch.Tensor:
    """Values that survive a round trip through fp16 (the released LoRA files are fp16)."""
    return tensor.half().float()


def _adapter_state(unet, lora_rank=4, seed=0):
    """A fresh FaceID adapter whose LoRA visibly acts (non-zero ``up``), all values fp16-exact."""
    generator = torch.Generator().manual_seed(seed)
    state = initial_state_dict(unet, lora_rank=lora_rank, generator=generator)
    for key, tensor in state["ip_adapter"].items():
        if key.endswith("up.weight"):
            tensor = torch.randn(tensor.shape, generator=generator) * 0.5
        state["ip_adapter"][key] = _half_exact(tensor)
    for key, tensor in state["image_proj"].items():
        state["image_proj"][key] = tensor + torch.randn(tensor.shape, generator=generator) * 0.05
    return state


def _without_lora(state):
    return {
        "image_proj": state["image_proj"],
        "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if "_lora." not in k},
    }


def _inputs(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    cad = unet.config.cross_attention_dim
    inputs = {  # small on purpose: the CPU test machines are shared
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(1, 8, cad, generator=generator),
    }
    return inputs, torch.randn(1, 4, cad, generator=generator)


@torch.no_grad()
def _run(unet, inputs, identity=None):
    kwargs = {"cross_attention_kwargs": {"ip_hidden_states": identity}} if identity is not None else {}
    return unet(**inputs, **kwargs).sample


def _style_lora(unet, rank=4, alpha=2.0, seed=3, targets=STYLE_TARGETS, text_encoder=True):
    """A kohya-format LoRA (as A1111/ComfyUI write it) for ``unet``, with alphas and text-encoder parts."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path in targets:
        module = unet.get_submodule(path)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        conv = isinstance(module, torch.nn.Conv2d)
        n_in, n_out = (module.in_channels, module.out_channels) if conv else (module.in_features, module.out_features)
        key = "lora_unet_" + path.replace(".", "_")
        down, up = (
            torch.randn(rank, n_in, generator=generator) * 0.3,
            torch.randn(n_out, rank, generator=generator) * 0.3,
        )
        state[f"{key}.lora_down.weight"] = _half_exact(down[..., None, None] if conv else down)
        state[f"{key}.lora_up.weight"] = _half_exact(up[..., None, None] if conv else up)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    if text_encoder:
        key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        state[f"{key}.lora_down.weight"] = torch.randn(rank, 32, generator=generator)
        state[f"{key}.lora_up.weight"] = torch.randn(32, rank, generator=generator)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


@torch.no_grad()
def _merge_by_hand(unet, kohya, weight):
    """W += weight * alpha / rank * up @ down on the plain layers: what a stacked LoRA must compute."""
    for key in [k for k in kohya if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        path = next(p for p in STYLE_TARGETS if "lora_unet_" + p.replace(".", "_") == stem)
        down, up = kohya[key], kohya[f"{stem}.lora_up.weight"]
        delta = weight * float(kohya[f"{stem}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        target = unet.get_submodule(path).weight
        target += delta.reshape(target.shape)


def _snapshot(unet):
    from peft.tuners.lora import LoraLayer

    layers = {p: m for p, m in unet.named_modules() if isinstance(m, LoraLayer)}
    return {
        "repr": repr(unet),
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in unet.named_parameters()},
        "active": {p: list(m.active_adapters) for p, m in layers.items()},
        "scaling": {p: dict(m.scaling) for p, m in layers.items()},
        "peft_config": list(getattr(unet, "peft_config", {})),
        "processors": dict(unet.attn_processors),
        "flag": unet.__dict__.get("_hf_peft_config_loaded"),
    }


def _assert_same_as(unet, snapshot):
    now = _snapshot(unet)
    for key in ("repr", "grads", "active", "scaling", "peft_config", "flag"):
        assert now[key] == snapshot[key], key
    assert now["state"].keys() == snapshot["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in snapshot["state"].items())
    assert all(unet.attn_processors[k] is v for k, v in snapshot["processors"].items())


# ---------------------------------------------------------------------- identity LoRA export
@pytest.mark.parametrize(("layout", "alpha"), [("kohya", False), ("kohya", True), ("diffusers", False)])
def test_exported_identity_lora_replaces_the_checkpoint_lora(tmp_path, layout, alpha):
    unet = make_tiny_unet()
    state = _adapter_state(unet)
    inputs, identity = _inputs(unet)
    full = FaceIDAdapter.install(unet, state)
    expected = _run(unet, inputs, identity)
    path = save_lora(full, tmp_path / "faceid_lora.safetensors", layout=layout, alpha=alpha)
    full.remove()

    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    assert metadata["faceid.layout"] == layout and metadata["faceid.lora_rank"] == "4"
    modules = 8 * 4  # every attention layer, to_q/to_k/to_v/to_out.0
    if layout == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
        assert len(keys) == modules * (3 if alpha else 2)
        assert all(k.startswith("lora_unet_") for k in keys)
    else:
        assert "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.weight" in keys
        assert len(keys) == modules * 2
        assert json.loads(metadata["lora_adapter_metadata"])["unet.r"] == 4

    # The adapter without its LoRA keys installs fine; the LoRA file brings the rest.
    adapter = FaceIDAdapter.install(unet, _without_lora(state))
    assert not adapter._lora_layers
    stack = LoraStack(unet)  # a bare UNet: the stack keeps the LoRAs it loads
    info = stack.load(path, "identity")
    assert (info.layout, info.ranks, len(info.modules), info.ignored) == (layout, (4,), modules, ())
    torch.testing.assert_close(_run(unet, inputs, identity), expected, atol=1e-5, rtol=0)
    assert stack.list() == {"identity": 1.0}


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_exported_file_loads_with_diffusers_own_loader(tmp_path, layout):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = make_tiny_unet()
    state = _adapter_state(unet)
    inputs, identity = _inputs(unet)
    full = FaceIDAdapter.install(unet, state)
    expected = _run(unet, inputs, identity)
    path = save_lora(full, tmp_path / "faceid_lora.safetensors", layout=layout)
    full.remove()

    FaceIDAdapter.install(unet, _without_lora(state))
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(path), adapter_name="identity")
    assert (unet.peft_config["identity"].r, unet.peft_config["identity"].lora_alpha) == (4, 4)
    torch.testing.assert_close(_run(unet, inputs, identity), expected, atol=1e-5, rtol=0)


def test_kohya_export_has_the_released_sd15_file_layout(tmp_path):
    """The layout of ip-adapter-faceid_sd15_lora.safetensors (h94/IP-Adapter-FaceID): a rank-128 fp16
    ``lora_down``/``lora_up`` pair on every attention projection of the SD1.5 UNet (to_q, to_k, to_v,
    to_out.0 of its 32 attention layers), kohya key names built from diffusers module paths, no ``.alpha``
    and no header metadata. (Written this way, the tensors make a file of the released file's Git LFS size,
    51,059,544 bytes; the size is not asserted, since it also depends on how safetensors lays out a header.)
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        sd15 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # the SD1.5 UNet config
    paths = [
        f"{name.removesuffix('.processor')}.{t}"
        for name in sd15.attn_processors
        for t in ("to_q", "to_k", "to_v", "to_out.0")
    ]

    def lora_layer(path):
        linear = sd15.get_submodule(path)
        down = types.SimpleNamespace(weight=torch.zeros(128, linear.in_features, dtype=torch.float16))
        up = types.SimpleNamespace(weight=torch.zeros(linear.out_features, 128, dtype=torch.float16))
        return types.SimpleNamespace(lora_A={"faceid": down}, lora_B={"faceid": up})

    layers = {path: lora_layer(path) for path in paths}
    stand_in = types.SimpleNamespace(
        installed=True, name="faceid", _lora_layers=paths, unet=types.SimpleNamespace(get_submodule=layers.__getitem__)
    )
    file = tmp_path / "sd15_lora.safetensors"
    save_file(identity_lora_state_dict(stand_in, "kohya"), str(file))

    expected = {}
    for path in paths:
        linear = sd15.get_submodule(path)
        stem = "lora_unet_" + path.replace(".", "_")
        expected[f"{stem}.lora_down.weight"] = ((128, linear.in_features), "F16")
        expected[f"{stem}.lora_up.weight"] = ((linear.out_features, 128), "F16")
    assert len(expected) == 32 * 4 * 2
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in expected
    with safe_open(str(file), framework="pt") as handle:
        assert handle.metadata() is None
        stored = {
            key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()) for key in handle.keys()
        }
    assert stored == expected
    assert stored["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"][0] == (128, 768)


# ---------------------------------------------------------------------- stacking
def test_style_lora_stacks_with_the_identity_lora_and_comes_out_cleanly():
    unet = make_tiny_unet()
    state = _adapter_state(unet)
    inputs, identity = _inputs(unet)
    plain_snapshot = _snapshot(unet)
    adapter = FaceIDAdapter.install(unet, state)
    unet.conv_in.requires_grad_(False)  # mixed flags: load/remove must leave every one of them alone
    with_identity = _run(unet, inputs, identity)
    before = _snapshot(unet)
    flags = {p: p.requires_grad for p in unet.parameters()}  # by object: PEFT renames what it wraps
    style = _style_lora(unet, rank=4, alpha=2.0)

    stack = LoraStack(unet)
    attributes = set(vars(unet))
    info = stack.load(style, "style", weight=0.0)
    assert set(vars(unet)) <= attributes | {"_hf_peft_config_loaded"}  # the stack keeps its records itself
    assert info.layout == "kohya" and set(info.modules) == set(STYLE_TARGETS)
    assert info.ignored and all(k.startswith("text_encoder.") for k in info.ignored)
    assert stack.list() == {"faceid": 1.0, "style": 0.0}
    assert all(p.requires_grad == flag for p, flag in flags.items())
    assert all(not p.requires_grad for p in unet.parameters() if p not in flags)  # the new LoRA is frozen
    shared = unet.get_submodule(STYLE_TARGETS[0])
    assert shared.active_adapters == ["faceid", "style"]
    assert torch.equal(_run(unet, inputs, identity), with_identity)  # weight 0: bit for bit the same

    stack.set_weight("style", 0.5)
    stacked = _run(unet, inputs, identity)
    assert not torch.allclose(stacked, with_identity, atol=1e-3)
    assert stack.list() == {"faceid": 1.0, "style": 0.5}

    # By hand: the style LoRA merged into a plain copy of the UNet at 0.5 * alpha/rank, then FaceID on top.
    manual_unet = make_tiny_unet()
    _merge_by_hand(manual_unet, style, 0.5)
    FaceIDAdapter.install(manual_unet, state)
    torch.testing.assert_close(stacked, _run(manual_unet, inputs, identity), atol=1e-5, rtol=1e-5)

    adapter.set_lora_scale(0.0)  # the identity LoRA still acts next to the style LoRA
    assert not torch.allclose(_run(unet, inputs, identity), stacked, atol=1e-3)
    adapter.set_lora_scale(1.0)
    assert torch.equal(_run(unet, inputs, identity), stacked)

    stack.remove("style")
    _assert_same_as(unet, before)
    assert torch.equal(_run(unet, inputs, identity), with_identity)
    assert stack.list() == {"faceid": 1.0}

    # Loading straight at 0.5 gives what set_lora_weight gave.
    stack.load(style, "style", weight=0.5)
    assert torch.equal(_run(unet, inputs, identity), stacked)
    stack.remove("style")
    _assert_same_as(unet, before)

    unet.conv_in.requires_grad_(True)
    adapter.remove()
    _assert_same_as(unet, plain_snapshot)


def test_switching_a_lora_out_and_back_in_changes_only_which_adapters_act():
    unet = make_tiny_unet()
    inputs, identity = _inputs(unet)
    FaceIDAdapter.install(unet, _adapter_state(unet))
    with_identity = _run(unet, inputs, identity)
    stack = LoraStack(unet)
    stack.load(_style_lora(unet, rank=4, alpha=2.0), "style", weight=0.5)
    stacked = _run(unet, inputs, identity)
    shared = unet.get_submodule(STYLE_TARGETS[0])
    shared.lora_A["style"].weight.requires_grad_(True)  # mixed flags on a layer that is switched
    unet.conv_in.requires_grad_(False)
    flags = {p: p.requires_grad for p in unet.parameters()}

    stack.set_active("style", False)
    assert shared.active_adapters == ["faceid"]
    assert all("style" not in unet.get_submodule(path).active_adapters for path in STYLE_TARGETS)
    assert all(p.requires_grad == flag for p, flag in flags.items())  # switching trains or freezes nothing
    assert torch.equal(_run(unet, inputs, identity), with_identity)  # out: as if it were not loaded
    assert stack.list() == {"faceid": 1.0, "style": 0.5}  # its weight kept

    stack.set_active("style", True)
    assert shared.active_adapters == ["faceid", "style"]
    assert all(p.requires_grad == flag for p, flag in flags.items())
    assert torch.equal(_run(unet, inputs, identity), stacked)


def test_style_loaded_before_the_adapter_keeps_working():
    unet = make_tiny_unet()
    state = _adapter_state(unet)
    inputs, identity = _inputs(unet)
    FaceIDAdapter.install(unet, state).remove()  # warm-up: nothing left behind
    style = _style_lora(unet, text_encoder=False)
    stack = LoraStack(unet)
    stack.load(style, "style", weight=0.7)
    adapter = FaceIDAdapter.install(unet, state)
    both = _run(unet, inputs, identity)
    manual_unet = make_tiny_unet()
    _merge_by_hand(manual_unet, style, 0.7)
    FaceIDAdapter.install(manual_unet, state)
    torch.testing.assert_close(both, _run(manual_unet, inputs, identity), atol=1e-5, rtol=1e-5)
    stack.remove("style")
    reference = make_tiny_unet()
    FaceIDAdapter.install(reference, state)
    assert torch.equal(_run(unet, inputs, identity), _run(reference, inputs, identity))
    adapter.remove()
    assert torch.equal(_run(unet, inputs), _run(make_tiny_unet(), inputs))


def test_removing_the_adapter_first_keeps_a_style_lora_loaded_after_it():
    """The identity LoRA and a later style LoRA share layers; the adapter leaves first, the style stays."""
    unet = make_tiny_unet()
    state = _adapter_state(unet)
    inputs, _ = _inputs(unet)
    plain = _snapshot(unet)
    adapter = FaceIDAdapter.install(unet, state)
    style = _style_lora(unet, text_encoder=False)
    stack = LoraStack(unet)
    stack.load(style, "style", weight=0.7)
    adapter.remove()
    assert stack.list() == {"style": 0.7}
    assert unet.get_submodule(STYLE_TARGETS[0]).active_adapters == ["style"]
    manual_unet = make_tiny_unet()
    _merge_by_hand(manual_unet, style, 0.7)
    torch.testing.assert_close(_run(unet, inputs), _run(manual_unet, inputs), atol=1e-5, rtol=1e-5)
    stack.remove("style")
    _assert_same_as(unet, plain)  # the layers PEFT wrapped for the identity LoRA are plain again


def _text_encoder_lora(encoder, modules, rank=4, alphas=(2.0,), seed=5, width=None):
    """Kohya text-encoder keys (``lora_te_text_model_...``, as A1111 writes them) for ``modules`` of ``encoder``;
    module i gets ``alphas[i % len(alphas)]``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, path in enumerate(modules):
        alpha = alphas[i % len(alphas)]
        module = encoder.get_submodule(path)
        n_in, n_out = width or module.in_features, width or module.out_features
        key = "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")
        state[f"{key}.lora_down.weight"] = _half_exact(torch.randn(rank, n_in, generator=generator) * 0.3)
        state[f"{key}.lora_up.weight"] = _half_exact(torch.randn(n_out, rank, generator=generator) * 0.3)
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _text_snapshot(encoder):
    return {
        "repr": repr(encoder),
        "state": {k: v.clone() for k, v in encoder.state_dict().items()},
        "peft_config": list(getattr(encoder, "peft_config", {})),
        "flag": encoder.__dict__.get("_hf_peft_config_loaded"),
    }


def test_text_encoder_part_goes_onto_the_text_encoder_with_the_same_weight(tiny_models):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None, requires_safety_checker=False)
    unet, encoder = pipe.unet, pipe.text_encoder
    ids = pipe.tokenizer(["a photo of a person"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    plain = encoder(ids)[0]
    unet_before, encoder_before = _snapshot(unet), _text_snapshot(encoder)
    # an attention projection without out_proj (diffusers' loader alone misses it) and an MLP layer,
    # each with its own alpha
    modules = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1", "encoder.layers.1.self_attn.v_proj"]
    text = _text_encoder_lora(encoder, modules, alphas=(2.0, 4.0))
    state = {**_style_lora(unet, targets=STYLE_TARGETS[:4], text_encoder=False), **text}

    stack = LoraStack(unet, text_encoders={"text_encoder": encoder})
    info = stack.load(state, "style", weight=0.5)
    assert info.ignored == ()
    assert set(info.text_encoder_modules) == {f"text_encoder.{m}" for m in modules}
    by_hand = CLIPTextModel.from_pretrained(tiny_models.sd15 / "text_encoder")  # a plain copy
    with torch.no_grad():
        for path in modules:
            stem = "lora_te_text_model_" + path.replace(".", "_")
            down, up = text[f"{stem}.lora_down.weight"], text[f"{stem}.lora_up.weight"]
            by_hand.get_submodule(path).weight += 0.5 * float(text[f"{stem}.alpha"]) / 4 * (up @ down)
    styled = encoder(ids)[0]
    torch.testing.assert_close(styled, by_hand(ids)[0], atol=1e-5, rtol=1e-5)

    stack.set_weight("style", 0.0)  # the weight applies to both parts
    assert torch.equal(encoder(ids)[0], plain)
    stack.set_weight("style", 0.5)
    assert torch.equal(encoder(ids)[0], styled)
    stack.remove("style")
    _assert_same_as(unet, unet_before)
    after = _text_snapshot(encoder)
    assert {k: after[k] for k in ("repr", "peft_config", "flag")} == {
        k: encoder_before[k] for k in ("repr", "peft_config", "flag")
    }
    assert all(torch.equal(after["state"][k], v) for k, v in encoder_before["state"].items())
    assert torch.equal(encoder(ids)[0], plain)

    # Without the text encoder the part is reported, not applied.
    bare = LoraStack(unet)
    info = bare.load(state, "style", weight=0.5)
    assert len(info.ignored) == 2 * len(modules) and info.text_encoder_modules == ()
    assert torch.equal(encoder(ids)[0], plain)
    bare.remove("style")


def test_sdxl_lora_reaches_both_text_encoders(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models.sdxl)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    ids = {
        key: tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        for key, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2))
    }
    plain = {key: encoder(ids[key])[0] for key, encoder in encoders.items()}
    # transformers 5 flattens CLIPTextModel but not CLIPTextModelWithProjection (text_model.encoder...)
    paths = {
        key: ("text_model." if hasattr(encoder, "text_model") else "") + "encoder.layers.0.self_attn.k_proj"
        for key, encoder in encoders.items()
    }
    state = {}
    for prefix, key in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for name, value in _text_encoder_lora(encoders[key], [paths[key]]).items():
            state[name.replace("lora_te_", prefix)] = value
    unet_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    state.update(_style_lora(pipe.unet, targets=[unet_path], text_encoder=False))
    stack = LoraStack(pipe.unet, text_encoders=encoders)
    info = stack.load(state, "style", weight=1.0)
    assert set(info.text_encoder_modules) == {f"{key}.{path}" for key, path in paths.items()}
    assert all(not torch.allclose(encoders[k](ids[k])[0], plain[k]) for k in encoders)
    stack.remove("style")
    assert all(torch.equal(encoders[k](ids[k])[0], plain[k]) for k in encoders)


def test_text_encoder_part_for_another_model_is_refused_and_nothing_stays(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None, requires_safety_checker=False)
    unet, encoder = pipe.unet, pipe.text_encoder
    unet_before, encoder_before = _snapshot(unet), _text_snapshot(encoder)
    wrong = _text_encoder_lora(encoder, ["encoder.layers.0.self_attn.q_proj"], width=48)  # made for a wider model
    state = {**_style_lora(unet, targets=STYLE_TARGETS[:4], text_encoder=False), **wrong}
    stack = LoraStack(unet, text_encoders={"text_encoder": encoder})
    with pytest.raises(CheckpointError, match="text_encoder part does not fit"):
        stack.load(state, "style")
    _assert_same_as(unet, unet_before)
    after = _text_snapshot(encoder)
    assert (after["repr"], after["peft_config"], after["flag"]) == (
        encoder_before["repr"],
        encoder_before["peft_config"],
        encoder_before["flag"],
    )
    assert stack.list() == {}


def test_sgm_named_kohya_lora_on_an_sdxl_unet():
    """SDXL LoRAs from kohya's trainer name blocks the SGM way (input_blocks_4_1); diffusers maps them."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=32,
    ).eval()
    inputs, _ = _inputs(unet)
    inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    plain = _run(unet, inputs)
    targets = [
        "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
    ]
    diffusers_named = _style_lora(unet, targets=targets, text_encoder=False)
    stack = LoraStack(unet)
    sgm = {
        k.replace("down_blocks_1_attentions_1", "input_blocks_5_1").replace(
            "up_blocks_0_attentions_2", "output_blocks_2_1"
        ): v
        for k, v in diffusers_named.items()
    }
    stack.load(diffusers_named, "a")
    expected = _run(unet, inputs)
    assert not torch.allclose(expected, plain, atol=1e-4)
    stack.remove("a")
    assert torch.equal(_run(unet, inputs), plain)
    info = stack.load(sgm, "b")
    assert set(info.modules) == set(targets)
    assert torch.equal(_run(unet, inputs), expected)


# ---------------------------------------------------------------------- refusals
def test_lora_for_another_base_model_is_refused_naming_the_layer(tmp_path):
    unet = make_tiny_unet()
    adapter = FaceIDAdapter.install(unet, _adapter_state(unet))
    snapshot = _snapshot(unet)
    other = make_tiny_unet(cross_attention_dim=2048)  # an "SDXL-wide" context
    wide = _style_lora(other, text_encoder=False)
    stack = LoraStack(unet)
    with pytest.raises(CheckpointError) as info:
        stack.load(wide, "style", label="wide.safetensors")
    message = str(info.value)
    assert "wide.safetensors does not fit" in message and "attn2.to_k is 2048->32" in message
    assert "layer is 64->32" in message and "made for SDXL" in message
    missing = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 64)
    }
    missing["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight"] = torch.zeros(64, 4)
    with pytest.raises(CheckpointError, match=r"1 of its 1 LoRA layers do not exist in this UNet"):
        stack.load(missing, "style")
    _assert_same_as(unet, snapshot)  # nothing was changed on the way
    adapter.remove()


def test_files_that_are_not_loras_are_refused(tmp_path):
    unet = make_tiny_unet()
    snapshot = _snapshot(unet)
    stack = LoraStack(unet)
    weights = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, str(weights))
    with pytest.raises(CheckpointError, match="model.safetensors is not a LoRA file"):
        stack.load(weights, "x")
    faceid = save_state_dict(_adapter_state(unet), tmp_path / "ip-adapter-faceid_sd15.safetensors")
    with pytest.raises(CheckpointError, match="IP-Adapter.*not a LoRA file"):
        stack.load(faceid, "x")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(faceid.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot read LoRA file"):
        stack.load(cut, "x")
    with pytest.raises(CheckpointError, match="not found"):
        stack.load(tmp_path / "missing.safetensors", "x")
    pickled = tmp_path / "lora.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, pickled)
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        stack.load(pickled, "x")
    _assert_same_as(unet, snapshot)


def test_a_name_in_use_is_refused():
    unet = make_tiny_unet()
    adapter = FaceIDAdapter.install(unet, _adapter_state(unet))
    stack = LoraStack(unet)
    stack.load(_style_lora(unet), "style")
    snapshot = _snapshot(unet)
    for name in ("style", adapter.name):
        with pytest.raises(CheckpointError, match=f"a LoRA named '{name}' is already loaded"):
            stack.load(_style_lora(unet, seed=9), name)
    _assert_same_as(unet, snapshot)
    with pytest.raises(ValueError, match="without '.'"):
        stack.load(_style_lora(unet), "my.style")
    with pytest.raises(KeyError, match="an identity LoRA goes with its FaceIDAdapter.remove"):
        stack.remove(adapter.name)
    with pytest.raises(KeyError, match="no LoRA named 'nope'"):
        stack.set_weight("nope", 1.0)


def test_lora_saved_by_diffusers_own_writer_loads_with_its_alpha(tmp_path):
    """``unet.save_lora_adapter`` writes unprefixed PEFT keys; its lora_alpha (!= rank) lives in the metadata."""
    from peft import LoraConfig

    trained = make_tiny_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"], init_lora_weights="gaussian")
    trained.add_adapter(config, adapter_name="mine")
    for module in trained.modules():
        if hasattr(module, "lora_B") and "mine" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["mine"].weight, std=0.2)
    inputs, _ = _inputs(trained)
    expected = _run(trained, inputs)
    trained.save_lora_adapter(str(tmp_path), adapter_name="mine")

    unet = make_tiny_unet()
    assert not torch.equal(_run(unet, inputs), expected)
    info = LoraStack(unet).load(tmp_path, "mine")  # a diffusers LoRA folder
    assert info.layout == "diffusers" and info.ranks == (4,)
    assert unet.peft_config["mine"].lora_alpha == 8
    assert torch.equal(_run(unet, inputs), expected)
