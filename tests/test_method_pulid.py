"""PuLID (SDXL v1.1 and FLUX.1 v0.9.1) against the authors' code: the golden folder's ``pulid/`` case.

Everything (settings, call arguments, sizes, tolerances) is read from the folder's ``manifest.json``, so another
draw of the golden data (other seeds) runs unchanged. See FORMAT.md, section "PuLID".
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import METHODS_GOLDEN_DIR

from faceid.errors import CheckpointError, FaceIDError
from faceid.methods.pulid import (
    IDFormerConfig,
    PuLIDFace,
    PuLIDFlux,
    PuLIDFluxBlock,
    PuLIDIdentity,
    PuLIDSDXL,
    PuLIDTokens,
    flux_ca_positions,
    read_checkpoint,
)

FOLDER = METHODS_GOLDEN_DIR / "pulid"
if not (FOLDER / "manifest.json").is_file():
    pytest.skip(f"no PuLID golden folder at {FOLDER}", allow_module_level=True)

MANIFEST = json.loads((FOLDER / "manifest.json").read_text())
V11, FLUX = MANIFEST["v1_1"], MANIFEST["flux_v0_9_1"]
INPUTS = np.load(FOLDER / "inputs.npz")
EXPECTED = np.load(FOLDER / "expected.npz")


def tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


def given(name: str) -> torch.Tensor:
    return tensor(INPUTS[name])


def recorded(name: str) -> torch.Tensor:
    return tensor(EXPECTED[name])


def check(name: str, actual: torch.Tensor) -> float:
    """``actual`` against the expected array ``name`` within its manifest atol; returns the difference."""
    info = MANIFEST["arrays"][name]
    expected = EXPECTED[name]
    actual_np = actual.detach().cpu().numpy()
    assert actual_np.shape == expected.shape, f"{name}: shape {actual_np.shape}, expected {expected.shape}"
    if info.get("exact"):
        assert np.array_equal(actual_np.astype(expected.dtype), expected), f"{name}: {actual_np} != {expected}"
        return 0.0
    diff = float(np.abs(actual_np.astype(np.float64) - expected).max())
    assert diff <= info["atol"], f"{name}: max |diff| {diff:.3g} > atol {info['atol']:.3g}"
    return diff


def face(letter: str) -> PuLIDFace:
    scales = sorted(k for k in INPUTS.files if k.startswith(f"eva_hidden_{letter}_"))
    return PuLIDFace(
        antelopev2=given(f"ante_emb_{letter}"),
        eva_projection=given(f"eva_id_cond_vit_{letter}"),
        eva_hidden=tuple(given(f"eva_hidden_{letter}_{j}") for j in range(len(scales))),
    )


def base(relative: str):
    return (FOLDER / relative).resolve()


# ----------------------------------------------------------------------------------------------------------------
# SDXL v1.1
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL UNet with the v1.1 file's processors installed, and the adapter."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base(V11["base_model"]) / "unet", torch_dtype=torch.float32).eval()
    assert list(unet.attn_processors) == V11["attn_processor_names_in_key_order"]
    adapter = PuLIDSDXL.from_file(FOLDER / V11["checkpoint"], unet).eval()
    adapter.install(unet)
    return unet, adapter


def time_ids(prefix: str) -> torch.Tensor:
    """The added time ids of a setting (recorded once, for the first setting: they are the same for all)."""
    name = f"{prefix}time_ids" if f"{prefix}time_ids" in EXPECTED.files else None
    name = name or next(k for k in EXPECTED.files if k.startswith("v11_") and k.endswith("time_ids"))
    return recorded(name)


def branch_inputs(prefix: str, positive: bool) -> dict:
    """The UNet inputs of one CFG branch (FORMAT.md's direct-call recipe): prompt, pooled, time ids."""
    neg = "" if positive else "negative_"
    return dict(
        encoder_hidden_states=given(f"sdxl_{neg}prompt_embeds"),
        added_cond_kwargs={"text_embeds": given(f"sdxl_{neg}pooled_prompt_embeds"), "time_ids": time_ids(prefix)},
    )


def tokens_for(setting: dict, embedding: torch.Tensor) -> PuLIDTokens:
    return PuLIDTokens(embedding, setting["id_scale"], setting["num_zero"], setting["ortho"])


def eps(unet, prefix: str, step: int, setting: dict, positive: bool) -> torch.Tensor:
    """One branch alone (no CFG batch) from the recorded UNet inputs."""
    embedding = recorded("v11_id_embedding_a" if positive else "v11_uncond_id_embedding")
    with torch.no_grad():
        return unet(
            recorded(f"{prefix}step{step}_unet_sample"),
            recorded(f"{prefix}step{step}_unet_timestep"),
            cross_attention_kwargs={"ip_hidden_states": tokens_for(setting, embedding)},
            **branch_inputs(prefix, positive),
        ).sample


def test_v11_sizes_are_read_off_the_file():
    state = read_checkpoint(FOLDER / V11["checkpoint"])
    prefix = "id_adapter."
    config = IDFormerConfig.from_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    for key, value in V11["idformer_kwargs"].items():
        assert getattr(config, key) == value, key
    assert (config.eva_width, config.id_cond_dim) == (V11["eva"]["width"], V11["eva"]["id_cond_dim"])


def test_v11_id_embeddings(sdxl):
    _, adapter = sdxl
    with torch.no_grad():
        one, uncond = adapter.encode([face("a")])
        both, uncond_both = adapter.encode([face("a"), face("b")])
    check("v11_id_embedding_a", one)
    check("v11_uncond_id_embedding", uncond)
    check("v11_id_embedding_ab", both)
    check("v11_uncond_id_embedding_ab", uncond_both)


@pytest.mark.parametrize("setting", V11["settings"], ids=lambda s: s["prefix"])
def test_v11_denoiser_steps_without_cfg(sdxl, setting):
    """Each branch alone (the conditional row without CFG, and the uncond row) at every recorded step."""
    unet, _ = sdxl
    prefix = setting["prefix"]
    steps = sorted({int(k[len(prefix) + 4]) for k in EXPECTED.files if k.startswith(prefix + "step")})
    for step in steps:
        check(f"{prefix}step{step}_eps_positive", eps(unet, prefix, step, setting, positive=True))
        check(f"{prefix}step{step}_eps_negative", eps(unet, prefix, step, setting, positive=False))


@pytest.mark.parametrize("setting", V11["settings"], ids=lambda s: s["prefix"])
def test_v11_sampling_with_cfg_batch(sdxl, setting):
    """The authors' run (karras sigmas, dpmpp_2m, CFG) as diffusers' DPMSolverMultistepScheduler (dpmsolver++,
    order 2, karras sigmas, final sigma 0), with [cond, uncond] in one UNet batch of 2 rows: every step's
    timestep, both rows, ``denoised`` and the next x, and the latents handed to the VAE."""
    from diffusers import DPMSolverMultistepScheduler

    unet, _ = sdxl
    inference = V11["inference"]
    if inference["sampler"] != "dpmpp_2m":
        pytest.skip(f"sampler {inference['sampler']} is not reproduced here")
    prefix, cfg = setting["prefix"], inference["guidance_scale"]
    folder = base(V11["base_model"])
    scheduler = DPMSolverMultistepScheduler.from_pretrained(
        folder,
        subfolder="scheduler",
        use_karras_sigmas=True,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(inference["steps"])
    scaling = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    pos, neg = branch_inputs(prefix, True), branch_inputs(prefix, False)
    batch = dict(
        encoder_hidden_states=torch.cat([pos["encoder_hidden_states"], neg["encoder_hidden_states"]]),
        added_cond_kwargs={
            key: torch.cat([pos["added_cond_kwargs"][key], neg["added_cond_kwargs"][key]])
            for key in ("text_embeds", "time_ids")
        },
    )
    identity = tokens_for(setting, torch.cat([recorded("v11_id_embedding_a"), recorded("v11_uncond_id_embedding")]))
    x = recorded(f"{prefix}step0_x")  # k-diffusion space: noise * sigma_max
    sample = x / (scheduler.sigmas[0] ** 2 + 1) ** 0.5  # diffusers' (VP) space
    for step, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[step]
        # diffusers computes the betas in float32, the authors in float64: the sigmas differ by ~3e-7 relative
        # (more than the 1e-6 floor of a passed-along input at 14.6), which every result below absorbs.
        assert torch.allclose(sigma.reshape(1), recorded(f"{prefix}step{step}_sigma"), rtol=1e-6, atol=1e-6)
        check(f"{prefix}step{step}_unet_timestep", t.reshape(1))
        if step:  # (step 0's x is the input itself)
            check(f"{prefix}step{step}_x", sample * (sigma**2 + 1) ** 0.5)
        with torch.no_grad():
            out = unet(torch.cat([sample] * 2), t, cross_attention_kwargs={"ip_hidden_states": identity}, **batch)
        positive, negative = out.sample.chunk(2)
        check(f"{prefix}step{step}_eps_positive", positive)
        check(f"{prefix}step{step}_eps_negative", negative)
        guided = negative + cfg * (positive - negative)
        check(f"{prefix}step{step}_denoised", sample * (sigma**2 + 1) ** 0.5 - guided * sigma)
        sample = scheduler.step(guided, t, sample).prev_sample
    check(f"{prefix}final_latents_scaled", sample / scaling)


def test_v11_flags_are_per_call_and_matter(sdxl):
    """Two settings' flags on one installed UNet: each call gets its own result (bit for bit the same as alone,
    also from two threads at once), and the flags change the output by more than the tolerance."""
    unet, _ = sdxl
    settings = V11["settings"]
    first, prefix = settings[0], settings[0]["prefix"]
    alone = [eps(unet, prefix, 0, s, True) for s in settings]
    with ThreadPoolExecutor(len(settings)) as pool:
        together = list(pool.map(lambda s: eps(unet, prefix, 0, s, True), settings * 2))
    for got, want in zip(together, alone * 2, strict=True):
        assert torch.equal(got, want)
    # Each flag on its own moves the output by more than the tolerance.
    atol = MANIFEST["arrays"][f"{prefix}step0_eps_positive"]["atol"]
    changed = 0
    for key in ("id_scale", "num_zero", "ortho"):
        for value in {s[key] for s in settings} - {first[key]}:
            assert (eps(unet, prefix, 0, first | {key: value}, True) - alone[0]).abs().max() > atol, (key, value)
            changed += 1
    assert changed >= 3


def test_v11_without_identity_is_the_base_unet(sdxl):
    """An installed UNet called without ``ip_hidden_states`` is the base model, bit for bit."""
    from diffusers import UNet2DConditionModel

    unet, _ = sdxl
    plain = UNet2DConditionModel.from_pretrained(base(V11["base_model"]) / "unet", torch_dtype=torch.float32).eval()
    prefix = V11["settings"][0]["prefix"]
    args = (recorded(f"{prefix}step0_unet_sample"), recorded(f"{prefix}step0_unet_timestep"))
    with torch.no_grad():
        assert torch.equal(
            unet(*args, **branch_inputs(prefix, True)).sample, plain(*args, **branch_inputs(prefix, True)).sample
        )


def test_v11_tokens_are_checked():
    embedding = recorded("v11_id_embedding_a")
    with pytest.raises(FaceIDError, match="ortho"):
        PuLIDTokens(embedding, ortho="v3")
    with pytest.raises(FaceIDError, match="num_zero"):
        PuLIDTokens(embedding, num_zero=-1)
    with pytest.raises(FaceIDError, match="batch, tokens, dim"):
        PuLIDTokens(embedding[0])


# ----------------------------------------------------------------------------------------------------------------
# FLUX v0.9.1
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    """diffusers' tiny FluxTransformer2DModel with the v0.9.1 file's CA modules attached, and the adapter."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(
        base(FLUX["base_model"]) / "transformer", torch_dtype=torch.float32
    ).eval()
    adapter = PuLIDFlux.from_file(FOLDER / FLUX["checkpoint"]).eval()
    adapter.attach(transformer)
    return transformer, adapter


def flux_call(transformer, img, timestep, rows: list[tuple[str, str]], weight) -> torch.Tensor:
    """The transformer on ``img`` for the given rows (text prefix, identity name or "" for none), one batch."""
    batch = len(rows)
    text = {"": ("flux_txt", "flux_vec"), "neg_": ("flux_neg_txt", "flux_neg_vec")}
    kwargs = {}
    ids = [name for _, name in rows]
    assert all(ids) or not any(ids), "the identity is on every row or on none"
    if all(ids):
        kwargs["joint_attention_kwargs"] = {"pulid": PuLIDIdentity(torch.cat([recorded(n) for n in ids]), weight)}
    with torch.no_grad():
        return transformer(
            hidden_states=img.expand(batch, -1, -1),
            timestep=timestep.expand(batch),
            guidance=torch.full((batch,), float(FLUX["denoise"]["guidance"])),
            pooled_projections=torch.cat([given(text[t][1]) for t, _ in rows]),
            encoder_hidden_states=torch.cat([given(text[t][0]) for t, _ in rows]),
            txt_ids=given("flux_txt_ids")[0],
            img_ids=given("flux_img_ids")[0],
            **kwargs,
        ).sample


def test_flux_sizes_and_interval_rule():
    state = read_checkpoint(FOLDER / FLUX["checkpoint"])
    adapter = PuLIDFlux.from_state_dict(state)
    for key, value in FLUX["idformer_kwargs"].items():
        assert getattr(adapter.pulid_encoder.config, key) == value, key
    ca = adapter.pulid_ca[0]
    sizes = {"dim": ca.to_q.in_features, "kv_dim": ca.to_kv.in_features, "heads": ca.heads, "dim_head": ca.dim_head}
    assert sizes == FLUX["ca_kwargs"]
    assert len(adapter.pulid_ca) == FLUX["num_pulid_ca"]
    # FLUX.1-dev's 19 double and 38 single blocks use exactly the released modules, each once, in order.
    double, single = flux_ca_positions(19, 38, FLUX["double_interval"], FLUX["single_interval"])
    used = [k for k in double + single if k is not None]
    assert used == list(range(FLUX["num_pulid_ca"]))
    assert [i for i, k in enumerate(double) if k is not None] == list(range(0, 19, FLUX["double_interval"]))
    assert [i for i, k in enumerate(single) if k is not None] == list(range(0, 38, FLUX["single_interval"]))
    # A transformer deeper than the file's modules cover is refused.
    deep = torch.nn.Module()
    deep.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(19))
    deep.single_transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(42))
    with pytest.raises(CheckpointError, match="need 21 PuLID"):
        adapter.attach(deep)


def test_flux_id_embeddings(flux):
    _, adapter = flux
    with torch.no_grad():
        identity, uncond = adapter.encode(face("a"))
    check("flux_id_embedding_a", identity)
    check("flux_uncond_id_embedding", uncond)


@pytest.mark.parametrize("setting", FLUX["settings"], ids=lambda s: s["prefix"])
def test_flux_steps_without_cfg(flux, setting):
    """The positive branch alone (and the negative one where recorded) from the recorded inputs."""
    transformer, _ = flux
    prefix = setting["prefix"]
    for step in range(FLUX["denoise"]["steps_run"]):
        p = f"{prefix}step{step}_"
        img, timestep = recorded(p + "img"), recorded(p + "timesteps")
        assert float(recorded(p + "guidance")[0]) == FLUX["denoise"]["guidance"]
        check(p + "pred", flux_call(transformer, img, timestep, [("", "flux_id_embedding_a")], setting["id_weight"]))
        if p + "pred_uncond" in EXPECTED.files:
            rows = [("neg_", "flux_uncond_id_embedding")]
            check(p + "pred_uncond", flux_call(transformer, img, timestep, rows, setting["id_weight"]))


@pytest.mark.parametrize("setting", FLUX["settings"], ids=lambda s: s["prefix"])
def test_flux_sampling(flux, setting):
    """The authors' ``denoise``: Euler steps on the recorded schedule through diffusers'
    FlowMatchEulerDiscreteScheduler (explicit sigmas, no further shift), true CFG as a [cond, uncond] batch."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer, _ = flux
    prefix, weight = setting["prefix"], setting["id_weight"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        base(FLUX["base_model"]), subfolder="scheduler", use_dynamic_shifting=False, shift=1.0
    )
    schedule = EXPECTED["flux_schedule"]
    assert schedule[-1] == 0  # diffusers appends the final 0 itself
    scheduler.set_timesteps(sigmas=schedule[:-1].tolist())
    true_cfg = abs(setting["true_cfg"] - 1.0) > 1e-2
    img = given("flux_img")
    for step in range(FLUX["denoise"]["steps_run"]):
        p = f"{prefix}step{step}_"
        check(p + "img", img)
        timestep = scheduler.sigmas[step : step + 1]
        check(p + "timesteps", timestep)
        with_id = step >= setting["start_step"]
        rows = [("", "flux_id_embedding_a" if with_id else "")]
        cfg = true_cfg and step >= setting["timestep_to_start_cfg"]
        if cfg:
            rows.append(("neg_", "flux_uncond_id_embedding" if with_id else ""))
        out = flux_call(transformer, img, timestep, rows, weight)
        pred = out[:1]
        check(p + "pred", pred)
        if cfg:
            check(p + "pred_uncond", out[1:])
            pred = out[1:] + setting["true_cfg"] * (pred - out[1:])
        img = scheduler.step(pred, scheduler.timesteps[step], img).prev_sample
    check(prefix + "final_img", img)


def test_flux_rows_do_not_mix(flux):
    """A 2-row batch with the identity on one row and the uncond identity on the other gives each row what
    that row gives alone (per-sample weights too), and without ``pulid`` the transformer is the base model."""
    transformer, _ = flux
    setting = FLUX["settings"][0]
    p = f"{setting['prefix']}step0_"
    img, timestep = recorded(p + "img"), recorded(p + "timesteps")
    atol = MANIFEST["arrays"][p + "pred"]["atol"]
    rows = [("", "flux_id_embedding_a"), ("", "flux_uncond_id_embedding")]
    both = flux_call(transformer, img, timestep, rows, [1.0, 0.5])
    first = flux_call(transformer, img, timestep, rows[:1], 1.0)
    second = flux_call(transformer, img, timestep, rows[1:], 0.5)
    assert (both[:1] - first).abs().max() <= atol and (both[1:] - second).abs().max() <= atol
    check(p + "pred", flux_call(transformer, img, timestep, rows[:1], setting["id_weight"]))
    # Without an identity: the base model (the CA terms are skipped), and different from the PuLID output.
    plain = flux_call(transformer, img, timestep, [("", "")], 1.0)
    PuLIDFlux.detach(transformer)
    try:
        assert not any(isinstance(b, PuLIDFluxBlock) for b in transformer.transformer_blocks)
        assert torch.equal(plain, flux_call(transformer, img, timestep, [("", "")], 1.0))
    finally:
        flux[1].attach(transformer)
    assert (plain - first).abs().max() > atol


# ----------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------


def _edited_copy(tmp_path, relative: str, edit) -> str:
    from safetensors.torch import save_file

    state = read_checkpoint(FOLDER / relative)
    edit(state)
    path = tmp_path / relative.split("/")[-1]
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize("which", ["v11", "flux"])
def test_strict_loading_refuses_missing_and_renamed_keys(tmp_path, which, sdxl):
    relative = V11["checkpoint"] if which == "v11" else FLUX["checkpoint"]
    state = read_checkpoint(FOLDER / relative)
    encoder, attention = (
        ("id_adapter.", "id_adapter_attn_layers.") if which == "v11" else ("pulid_encoder.", "pulid_ca.")
    )
    victims = [
        sorted(k for k in state if k.startswith(attention))[-1],
        sorted(k for k in state if k.startswith(encoder))[0],
    ]

    def load(path):
        return PuLIDSDXL.from_file(path, sdxl[0]) if which == "v11" else PuLIDFlux.from_file(path)

    assert load(FOLDER / relative) is not None
    for victim in victims:  # a CA/processor weight, then a tensor the encoder's sizes are read from
        removed = _edited_copy(tmp_path, relative, lambda s, victim=victim: s.pop(victim))
        with pytest.raises(CheckpointError, match=r"missing key|lacks the key") as info:
            load(removed)
        assert victim.split(".", 1)[1] in str(info.value)
        renamed = _edited_copy(
            tmp_path, relative, lambda s, victim=victim: s.update({victim + "_renamed": s.pop(victim)})
        )
        with pytest.raises(CheckpointError, match=r"missing key|lacks the key") as info:
            load(renamed)
        assert victim.split(".", 1)[1] in str(info.value)
        if victim == victims[0]:  # the layout check names the stray key too
            assert f"unexpected key(s) {victim + '_renamed'!r}" in str(info.value)
    broken = tmp_path / "broken.safetensors"
    shutil.copyfile(FOLDER / relative, broken)
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        load(broken)


def test_files_for_another_model_are_refused(sdxl):
    """A v1.1 file whose layers are not this UNet's cross-attention layers, and a FLUX file on a transformer of
    another width, are refused saying so."""
    state = read_checkpoint(FOLDER / V11["checkpoint"])
    last = max(int(k.split(".")[1]) for k in state if k.startswith("id_adapter_attn_layers."))
    fewer = {k: v for k, v in state.items() if not k.startswith(f"id_adapter_attn_layers.{last}.")}
    with pytest.raises(CheckpointError, match="cross-attention layers are at positions"):
        PuLIDSDXL.from_state_dict(fewer, sdxl[0])
    adapter = PuLIDFlux.from_file(FOLDER / FLUX["checkpoint"])
    other = torch.nn.Module()
    other.inner_dim = 2 * adapter.pulid_ca[0].to_q.in_features
    other.transformer_blocks = torch.nn.ModuleList([torch.nn.Identity()])
    other.single_transformer_blocks = torch.nn.ModuleList([torch.nn.Identity()])
    with pytest.raises(CheckpointError, match="width"):
        adapter.attach(other)
    assert isinstance(other.transformer_blocks[0], torch.nn.Identity)
