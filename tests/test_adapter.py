"""The adapter as a reversible edit of a UNet: install, knobs, fusing, removal, checkpoints, refusals."""

from __future__ import annotations

import gc
import pickle
import weakref

import pytest
import torch
from conftest import make_tiny_unet
from tiny_models import unet_inputs

from faceid.adapter import FaceIDAdapter, initial_state_dict
from faceid.attention import CallTokens, TokenGroup
from faceid.checkpoints import AdapterSpec, load_state_dict, save_state_dict
from faceid.errors import CheckpointError, FaceIDError


def _random_adapter_state(unet, num_tokens=4, lora_rank=4, seed=0):
    """A fresh adapter whose LoRA ``up`` weights are non-zero, so that the LoRA visibly acts."""
    generator = torch.Generator().manual_seed(seed)
    state = initial_state_dict(unet, num_tokens=num_tokens, lora_rank=lora_rank, generator=generator)
    for key, tensor in state["ip_adapter"].items():
        if key.endswith("up.weight"):
            state["ip_adapter"][key] = torch.randn(tensor.shape, generator=generator) * 0.5
    for tensor in state["image_proj"].values():
        tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return state


@torch.no_grad()
def _run(unet, inputs, identity=None):
    kwargs = {"cross_attention_kwargs": {"ip_hidden_states": identity}} if identity is not None else {}
    return unet(**inputs, **kwargs).sample


def _snapshot(unet):
    return (
        repr(unet),
        {k: v.clone() for k, v in unet.state_dict().items()},
        dict(unet.attn_processors),
        {n: p.requires_grad for n, p in unet.named_parameters()},
    )


def _assert_same_as(unet, snapshot):
    text, state, processors, grads = snapshot
    assert repr(unet) == text
    now = unet.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads


def test_install_then_remove_leaves_unet_as_it_was(tiny_unet):
    inputs, identity = unet_inputs(tiny_unet)
    before_output = _run(tiny_unet, inputs)
    snapshot = _snapshot(tiny_unet)
    flags = {p: p.requires_grad for p in tiny_unet.parameters()}
    for _ in range(2):  # twice: the second install must not see leftovers of the first
        adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
        assert repr(tiny_unet) != snapshot[0]
        assert all(p.requires_grad == flag for p, flag in flags.items())  # the UNet's own flags untouched
        assert not torch.equal(_run(tiny_unet, inputs, identity), before_output)
        adapter.remove()
        _assert_same_as(tiny_unet, snapshot)
    assert torch.equal(_run(tiny_unet, inputs), before_output)


def test_scale_zero_and_lora_zero_is_the_plain_unet_bit_for_bit(tiny_unet):
    inputs, identity = unet_inputs(tiny_unet)
    plain = _run(tiny_unet, inputs)
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet), scale=0.0, lora_scale=0.0)
    assert torch.equal(_run(tiny_unet, inputs, identity), plain)
    adapter.set_scale(1.0)
    assert not torch.equal(_run(tiny_unet, inputs, identity), plain)


def test_scale_and_lora_scale_change_without_reloading(tiny_unet):
    state = _random_adapter_state(tiny_unet)
    inputs, identity = unet_inputs(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, state)
    outputs = {}
    for scale, lora_scale in [(1.0, 1.0), (0.5, 1.0), (1.0, 0.3), (0.0, 1.0)]:
        adapter.set_scale(scale)
        adapter.set_lora_scale(lora_scale)
        outputs[scale, lora_scale] = _run(tiny_unet, inputs, identity)
    adapter.remove()
    assert len({tuple(o.flatten()[:8].tolist()) for o in outputs.values()}) == len(outputs)
    for (scale, lora_scale), output in outputs.items():  # the same as a fresh install at those values
        fresh = FaceIDAdapter.install(tiny_unet, state, scale=scale, lora_scale=lora_scale)
        assert torch.equal(_run(tiny_unet, inputs, identity), output)
        fresh.remove()


def test_a_calls_scale_lives_in_its_token_group_not_on_the_adapter(tiny_unet):
    state = _random_adapter_state(tiny_unet)
    inputs, identity = unet_inputs(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, state, scale=0.7, lora_scale=0.0)
    as_group = _run(tiny_unet, inputs, [TokenGroup(identity, adapter.name, 0.2)])
    assert adapter.scale == 0.7 and all(b.scale == 0.7 for b in adapter.branches.values())  # untouched
    adapter.remove()
    FaceIDAdapter.install(tiny_unet, state, scale=0.2, lora_scale=0.0)
    assert torch.equal(as_group, _run(tiny_unet, inputs, identity))  # what the adapter at 0.2 computes


def test_fused_lora_matches_unfused_and_unfuse_restores_weights(tiny_unet):
    inputs, identity = unet_inputs(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet), lora_scale=0.8)
    unfused = _run(tiny_unet, inputs, identity)
    bases = {p: tiny_unet.get_submodule(p).get_base_layer().weight.clone() for p in adapter._lora_layers}
    adapter.fuse_lora()
    assert adapter.lora_fused
    fused = _run(tiny_unet, inputs, identity)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    with pytest.raises(FaceIDError, match="unfuse"):
        adapter.set_lora_scale(0.5)
    adapter.unfuse_lora()
    for path, weight in bases.items():
        assert torch.equal(tiny_unet.get_submodule(path).get_base_layer().weight, weight)
    assert torch.equal(_run(tiny_unet, inputs, identity), unfused)


def test_remove_while_fused_restores_the_unet(tiny_unet):
    snapshot = _snapshot(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
    adapter.fuse_lora()
    adapter.remove()
    _assert_same_as(tiny_unet, snapshot)


def test_a_calls_cache_computes_context_projections_once_and_changes_nothing(tiny_unet):
    inputs, identity = unet_inputs(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
    uncached = [_run(tiny_unet, inputs, identity) for _ in range(3)]
    calls = []
    handles = [b.to_k_ip.register_forward_hook(lambda *a: calls.append(1)) for b in adapter.branches.values()]
    call = CallTokens([TokenGroup(identity, adapter.name, adapter.scale)])  # the same object at every step
    cached = [_run(tiny_unet, inputs, call) for _ in range(3)]
    assert len(calls) == len(adapter.processors)  # once per layer, not once per step
    for handle in handles:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached, strict=True))
    cache = weakref.ref(call.cache)
    del call
    gc.collect()
    assert cache() is None  # the call's keys/values go with it: nothing on the UNet holds them


def test_identity_tokens_batch_must_match(tiny_unet):
    inputs, identity = unet_inputs(tiny_unet)
    FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
    with pytest.raises(ValueError, match="batch"):
        _run(tiny_unet, inputs, identity[:1])


def test_uncond_tokens_are_the_projection_of_zeros(tiny_unet):
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
    embeds = torch.nn.functional.normalize(torch.randn(3, 512), dim=-1)
    cond, uncond = adapter.identity_tokens(embeds)
    assert cond.shape == uncond.shape == (3, 4, 64)
    with torch.no_grad():
        assert torch.equal(uncond, adapter.projection(torch.zeros(3, 512)))
    assert not torch.allclose(uncond, torch.zeros_like(uncond))


def test_portrait_tokens_concatenate_faces(tiny_unet):
    state = _random_adapter_state(tiny_unet, num_tokens=16, lora_rank=None)
    adapter = FaceIDAdapter.install(tiny_unet, state)
    assert adapter.spec.variant == "faceid-portrait" and adapter.spec.lora_rank is None
    faces = torch.randn(2, 3, 512)
    cond, _ = adapter.identity_tokens(faces)
    assert cond.shape == (2, 48, 64)
    single, _ = adapter.identity_tokens(faces[1, 2][None])
    torch.testing.assert_close(cond[1, 32:], single[0])


def test_user_lora_survives_install_and_remove(tiny_unet):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    inject_adapter_in_model(config, tiny_unet, adapter_name="style")
    for module in tiny_unet.modules():
        if hasattr(module, "lora_B") and "style" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["style"].weight, std=0.5)
    inputs, identity = unet_inputs(tiny_unet)
    styled = _run(tiny_unet, inputs)
    snapshot = _snapshot(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, _random_adapter_state(tiny_unet))
    to_q = tiny_unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert set(to_q.active_adapters) == {"style", "faceid"}
    adapter.set_scale(0.0)
    adapter.set_lora_scale(0.0)
    assert torch.equal(_run(tiny_unet, inputs, identity), styled)  # the style LoRA still acts
    adapter.remove()
    _assert_same_as(tiny_unet, snapshot)
    assert to_q.active_adapters == ["style"]
    assert torch.equal(_run(tiny_unet, inputs), styled)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_export_round_trip(tiny_unet, tmp_path, suffix):
    state = _random_adapter_state(tiny_unet)
    adapter = FaceIDAdapter.install(tiny_unet, state)
    inputs, identity = unet_inputs(tiny_unet)
    output = _run(tiny_unet, inputs, identity)
    exported = adapter.state_dict()
    assert {g: set(v) for g, v in exported.items()} == {g: set(v) for g, v in state.items()}
    path = save_state_dict(exported, tmp_path / f"adapter{suffix}", dtype=torch.float32)
    adapter.remove()
    reloaded = load_state_dict(path)
    for group in state:
        for key in state[group]:
            assert torch.equal(reloaded[group][key], exported[group][key])
    FaceIDAdapter.install(tiny_unet, path)
    assert torch.equal(_run(tiny_unet, inputs, identity), output)


def test_checkpoints_of_every_variant_describe_themselves(tiny_models):
    """Both official layouts of each variant (the reference's own files: test_golden.py)."""
    specs = {}
    for name in ("faceid", "faceid-plusv2", "faceid-portrait", "faceid-sdxl", "faceid-plusv2-sdxl"):
        states = [load_state_dict(tiny_models.adapter(name, fmt)) for fmt in ("bin", "safetensors")]
        for group in states[0]:
            assert states[0][group].keys() == states[1][group].keys()
            assert all(torch.equal(v, states[1][group][k]) for k, v in states[0][group].items())
        specs[name] = AdapterSpec.from_state_dict(states[0])
    assert specs["faceid"].variant == "faceid" and specs["faceid"].lora_rank == 8 and specs["faceid"].num_tokens == 4
    assert specs["faceid"].cross_attention_dim == 64 and len(specs["faceid"].ip_layers) == 4
    portrait = specs["faceid-portrait"]
    assert portrait.variant == "faceid-portrait" and portrait.num_tokens == 16 and portrait.lora_rank is None
    assert specs["faceid-sdxl"].variant == "faceid" and specs["faceid-sdxl"].cross_attention_dim == 128
    assert len(specs["faceid-sdxl"].ip_layers) == 8  # transformer_layers_per_block (1, 2): 8 cross-attention layers
    for name, cad in (("faceid-plusv2", 64), ("faceid-plusv2-sdxl", 128)):
        assert specs[name].variant == "faceid-plus" and specs[name].cross_attention_dim == cad
        assert specs[name].perceiver.clip_dim == 48  # the tiny image encoder's width


# ---------------------------------------------------------------------- refusals
def test_checkpoint_for_another_base_model_is_refused(tiny_unet):
    other = make_tiny_unet(cross_attention_dim=128)
    snapshot = _snapshot(tiny_unet)
    with pytest.raises(CheckpointError) as info:
        FaceIDAdapter.install(tiny_unet, _random_adapter_state(other), name="faceid")
    message = str(info.value)
    assert "cross-attention dim 128" in message and "cross-attention dim 64" in message
    _assert_same_as(tiny_unet, snapshot)  # nothing was changed on the way


def test_sd15_checkpoint_on_sdxl_sizes_names_both_families():
    from faceid.adapter import check_fits

    sd15 = AdapterSpec(768, 4, 512, 1024, None, 128, {1: (320, 768)}, {})
    unet = make_tiny_unet(cross_attention_dim=2048)
    from faceid.adapter import _attention_layers

    with pytest.raises(CheckpointError, match=r"for SD1\.5 .*base model is SDXL.*made for SDXL"):
        check_fits(sd15, unet, _attention_layers(unet), "ip-adapter-faceid_sd15.bin")


def test_checkpoint_with_wrong_layer_count_is_refused(tiny_unet):
    state = _random_adapter_state(tiny_unet)
    for key in [k for k in state["ip_adapter"] if k.startswith("7.")]:
        del state["ip_adapter"][key]
    with pytest.raises(CheckpointError, match="layer numbering"):
        FaceIDAdapter.install(tiny_unet, state)


def test_checkpoint_with_unknown_keys_is_refused(tiny_unet):
    state = _random_adapter_state(tiny_unet)
    state["ip_adapter"]["1.to_x_ip.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="unknown key 'ip_adapter.1.to_x_ip.weight'"):
        FaceIDAdapter.install(tiny_unet, state)


def test_plain_ip_adapter_checkpoint_is_refused(tiny_unet):
    state = {"image_proj": {"proj.weight": torch.zeros(256, 1024), "norm.weight": torch.zeros(64)}, "ip_adapter": {}}
    with pytest.raises(CheckpointError, match="not an IP-Adapter-FaceID projection"):
        FaceIDAdapter.install(tiny_unet, state)


def test_unreadable_checkpoints_are_refused(tmp_path, tiny_unet):
    truncated = tmp_path / "cut.safetensors"
    save_state_dict(_random_adapter_state(tiny_unet), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.bin")
    wrong = tmp_path / "model.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, wrong)
    with pytest.raises(CheckpointError, match="expected the groups 'image_proj' and 'ip_adapter'"):
        load_state_dict(wrong)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickles_that_run_code_are_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"image_proj": _Exploit(), "ip_adapter": {}}))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(evil)
    assert not (tmp_path / "PWNED").exists()
