"""A compiled UNet (``FaceIDPipeline.compile``): the per-call knobs are tensors, so changing them between calls (or
the identity window within one) compiles nothing new, and the compiled pipeline computes what the eager one does.

Dynamo's work is counted with ``torch._dynamo.testing.CompileCounterWithBackend``: every graph it compiles
(first compilation, recompilation, or the pieces around a graph break) adds one frame. Most tests trace with
the ``eager`` backend (the full Dynamo front end and its guards, no code generation), which keeps them at a
few seconds on a CPU; one compiles a single attention layer with inductor.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from safetensors.torch import save_file
from tiny_models import unet_inputs
from torch._dynamo.testing import CompileCounterWithBackend, EagerAndRecordGraphs

from faceid.adapter import FaceIDAdapter, initial_state_dict
from faceid.attention import TokenGroup
from faceid.peft_adapters import tensor_scalings
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 24, "height": 16, "num_inference_steps": 2, "output_type": "latent"}
STYLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _embedding(seed):
    return torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _style_lora_file(unet, path, seed=3):
    """A kohya LoRA on the first transformer block's attention layers (those the identity LoRA adapts too)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    block = next(name for name, _ in unet.named_modules() if name.endswith("transformer_blocks.0"))
    for attn in ("attn1", "attn2"):
        for target in STYLE_TARGETS:
            module_path = f"{block}.{attn}.{target}"
            linear = unet.get_submodule(module_path)
            linear = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
            key = "lora_unet_" + module_path.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


# Each call differs from the first in one knob (``style`` is the weight of a stacked LoRA); the face, prompt and
# seed change tensor values only, the window switches the identity branch and LoRA off for the first step.
CALLS = {
    "first": {},
    "scale": {"scale": 0.4},
    "lora_scale": {"lora_scale": 0.3},
    "style weight": {"style": 0.25},
    "window": {"identity_window": (0.5, 1.0)},
    "face": {"face": 1},
    "prompt": {"prompt": "an oil painting of a man in a red scarf"},
    "seed": {"seed": 11},
    "scale 0": {"scale": 0.0, "lora_scale": 0.0, "style": 0.0},
}
# SDXL (slower to trace and run): the same knobs, all changed at once, then the window.
SDXL_CALLS = {
    "first": {},
    "all but the window": {
        "scale": 0.4,
        "lora_scale": 0.3,
        "style": 0.25,
        "face": 1,
        "prompt": CALLS["prompt"]["prompt"],
        "seed": 11,
    },
    "window": CALLS["window"],
}


def _run_calls(pipe, calls):
    outputs = {}
    for label, change in calls.items():
        call = {"prompt": "a portrait", "face": 0, "seed": 5, "style": 1.0, **change}
        pipe.set_lora_weight("style", call.pop("style"))
        call["face"] = _embedding(call["face"])
        outputs[label] = pipe(**call, **SIZE).images
    return outputs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_changing_the_knobs_between_calls_compiles_nothing_new(tiny_models, tmp_path, family):
    base, adapter = (tiny_models.sd15, "faceid") if family == "sd15" else (tiny_models.sdxl, "faceid-sdxl")
    calls = CALLS if family == "sd15" else SDXL_CALLS
    pipe = FaceIDPipeline.from_pretrained(base, tiny_models.adapter(adapter), device="cpu", progress=False)
    pipe.load_lora(_style_lora_file(pipe.pipe.unet, tmp_path / "style.safetensors"), name="style")
    eager = _run_calls(pipe, calls)
    assert len({tuple(v.flatten()[:16].tolist()) for v in eager.values()}) == len(calls)  # every knob acts

    counter = CompileCounterWithBackend("eager")
    assert not pipe.compiled
    pipe.compile(backend=counter)
    assert pipe.compiled
    frames = {}
    for label in calls:
        output = _run_calls(pipe, {label: calls[label]})[label]
        frames[label] = counter.frame_count
        torch.testing.assert_close(output, eager[label], rtol=1e-5, atol=1e-5, msg=f"compiled != eager: {label}")
    # One graph (no graph break, in the attention processors or elsewhere), compiled at the first call only.
    assert frames == dict.fromkeys(frames, 1), frames
    if family == "sdxl":
        return

    # A LoRA loaded after compiling: the first call with it compiles once (new modules), its weight then is a knob.
    pipe.load_lora(_style_lora_file(pipe.pipe.unet, tmp_path / "late.safetensors", seed=8), name="late")
    pipe("a portrait", _embedding(0), seed=5, **SIZE)
    assert counter.frame_count == 2
    pipe.set_lora_weight("late", 0.5)
    pipe("a portrait", _embedding(0), seed=5, **SIZE)
    assert counter.frame_count == 2


def test_fused_identity_lora_is_out_of_the_compiled_graph(tiny_models):
    """With its weight fixed the identity LoRA is fused: the graph has no LoRA matmul, and still no recompiles."""
    pipe = FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False, fuse_lora=True, lora_scale=0.8
    )
    eager = [pipe("a portrait", _embedding(i), seed=5 + i, scale=0.5 + i / 4, **SIZE).images for i in range(3)]
    recorder = EagerAndRecordGraphs()
    counter = CompileCounterWithBackend(recorder)
    pipe.compile(backend=counter)
    for i in range(3):  # face, seed and scale change
        compiled = pipe("a portrait", _embedding(i), seed=5 + i, scale=0.5 + i / 4, **SIZE).images
        torch.testing.assert_close(compiled, eager[i], rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    (graph,) = recorder.graphs
    assert "lora_A" not in graph.code and "to_k_ip" in graph.code

    pipe.adapter.unfuse_lora()  # unfused, the LoRA is back in the graph: one recompilation
    pipe("a portrait", _embedding(0), seed=5, **SIZE)
    assert counter.frame_count == 2 and "lora_A" in recorder.graphs[-1].code


def _installed_unet(seed=0):
    unet = make_tiny_unet()
    generator = torch.Generator().manual_seed(seed)
    state = initial_state_dict(unet, num_tokens=4, lora_rank=4, generator=generator)
    for key, tensor in state["ip_adapter"].items():
        if key.endswith("up.weight"):
            state["ip_adapter"][key] = torch.randn(tensor.shape, generator=generator) * 0.5
    return unet, state


def _unet_inputs(unet):
    inputs, tokens = unet_inputs(unet)
    return {**inputs, "cross_attention_kwargs": {"ip_hidden_states": tokens}}


@torch.no_grad()
def test_per_sample_scale_and_zero_are_exact_when_compiled():
    """A scale per sample weighs each sample as a call at that scale would; where it is 0 the sample is bit for bit
    the UNet without adapter, even with an identity branch that computes inf/nan (selected, not multiplied by 0)."""
    unet, state = _installed_unet()
    inputs = _unet_inputs(unet)
    plain_inputs = {k: v for k, v in inputs.items() if k != "cross_attention_kwargs"}
    plain = unet(**plain_inputs).sample
    adapter = FaceIDAdapter.install(unet, state, scale=0.8, lora_scale=0.0)  # per sample: the identity branch
    at_08 = unet(**inputs).sample
    tokens = inputs["cross_attention_kwargs"]["ip_hidden_states"]

    def with_scale(scale):  # a call's identity group, its scale one number or one per sample
        return {**plain_inputs, "cross_attention_kwargs": {"ip_hidden_states": [TokenGroup(tokens, "faceid", scale)]}}

    eager_mixed = unet(**with_scale([0.8, 0.0])).sample
    assert torch.equal(eager_mixed[0], at_08[0])
    assert torch.equal(eager_mixed[1], plain[1])

    counter = CompileCounterWithBackend("eager")
    unet.compile(backend=counter)
    torch.testing.assert_close(unet(**with_scale([0.8, 0.0])).sample, eager_mixed, rtol=1e-5, atol=1e-5)
    for branch in adapter.branches.values():  # a branch that overflows: inf keys and values
        branch.to_v_ip.weight.fill_(float("inf"))
    assert torch.equal(unet(**with_scale(0.0)).sample, plain)  # a new batch-1 scale shape: one recompilation
    assert torch.equal(unet(**with_scale([0.0, 0.0])).sample, plain)
    assert counter.frame_count == 2


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
@torch.no_grad()
def test_inductor_compiles_an_attention_layer_with_the_identity_branch():
    """Inductor (the default backend) generates code for the processor, its tensor knobs and the PEFT LoRA: the
    same results as eager for other scales and LoRA weights, with no recompilation. (The whole tiny pipeline
    compiles too, but takes minutes on a 2-core CPU.)"""
    unet, state = _installed_unet()
    adapter = FaceIDAdapter.install(unet, state)
    path, attn = next((p, m) for p, m in unet.named_modules() if p.endswith("attn2"))
    cad = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 24, attn.to_q.in_features, generator=generator)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, cad, generator=generator),
        "ip_hidden_states": torch.randn(2, 4, cad, generator=generator),
    }
    knobs = [(1.0, 1.0), (0.3, 0.6), (0.0, 0.0)]

    def call(layer, scale, lora_scale):  # the call's identity scale in its group; the LoRA weight set between calls
        adapter.set_lora_scale(lora_scale)
        group = TokenGroup(kwargs["ip_hidden_states"], adapter.name, scale)
        return layer(hidden, encoder_hidden_states=kwargs["encoder_hidden_states"], ip_hidden_states=[group])

    eager = [call(attn, scale, lora_scale) for scale, lora_scale in knobs]
    tensor_scalings(unet)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attn, backend=counter)
    for (scale, lora_scale), expected in zip(knobs, eager, strict=True):
        torch.testing.assert_close(call(compiled, scale, lora_scale), expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, path


def test_cli_compile_fuses_a_fixed_identity_lora(tmp_path, monkeypatch, tiny_models, faces_dir, face_models_dir):
    """``faceid generate --compile`` compiles the UNet, fusing the identity LoRA when nothing changes its weight
    during the run (no identity window), and draws the image the uncompiled fused pipeline draws."""
    from PIL import Image

    from faceid.cli import main

    compiled = []

    def compile_traced(self, mode=None, backend=None):  # trace with the eager backend: seconds, not minutes
        compiled.append(self)
        return original(self, mode=mode, backend="eager")

    original = FaceIDPipeline.compile
    monkeypatch.setattr(FaceIDPipeline, "compile", compile_traced)
    model = ["--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors"))]

    def generate(out, *extra):
        argv = ["generate", "--face", str(faces_dir / "biden.jpg"), "--prompt", "a photo", "--out", str(out)]
        size = ["--steps", "2", "--width", "24", "--height", "16", "--seed", "1"]
        assert main([*argv, *model, *size, "--face-models", str(face_models_dir), *extra]) == 0
        return np.asarray(Image.open(out / "biden_s1.png"))

    fused = generate(tmp_path / "fused", "--fuse-lora")
    assert not compiled
    assert np.array_equal(generate(tmp_path / "compiled", "--compile"), fused)
    assert compiled[-1].compiled and compiled[-1].adapter.lora_fused
    generate(tmp_path / "window", "--compile", "--window", "0", "0.5")
    assert compiled[-1].compiled and not compiled[-1].adapter.lora_fused  # the window switches the LoRA


@torch.no_grad()
def test_token_groups_compile_once_and_their_windows_recompile_nothing():
    """Several people (masked groups): compiled equals eager, and a group's window shutting and opening, or
    new groups of the same shapes (the next call), reuse the one graph."""
    from tiny_models import adapter_state

    from faceid.groups import region_mask

    unet = make_tiny_unet()
    inputs, tokens = unet_inputs(unet)
    FaceIDAdapter.install(unet, adapter_state(unet, "faceid"))
    left = region_mask((0, 0, 0.5, 1), 24, 16)

    def groups(a, b, scale=0.5):
        return [TokenGroup(a, "faceid", mask=left), TokenGroup(b, "faceid", scale, mask=1 - left)]

    def run(value):
        return unet(**inputs, cross_attention_kwargs={"ip_hidden_states": value}).sample

    first = groups(tokens, tokens * 2)
    eager_open = run(first)
    first[1].set_open(False)
    eager_shut = run(first)
    first[1].set_open(True)
    eager_next = run(groups(tokens * 3, tokens, 0.7))
    counter = CompileCounterWithBackend("eager")
    unet.compile(backend=counter)
    assert torch.equal(run(first), eager_open)
    first[1].set_open(False)
    assert torch.equal(run(first), eager_shut)
    assert torch.equal(run(groups(tokens * 3, tokens, 0.7)), eager_next)
    assert counter.frame_count == 1
