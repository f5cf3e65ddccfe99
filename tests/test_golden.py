"""Every case of a golden folder, reproduced through faceid's own API, within each array's tolerance.

The golden folder (``FACEID_GOLDEN_DIR``, default ``../shared/golden``) holds outputs of the official
reference implementation on tiny random-weight models; its ``FORMAT.md`` describes the layout. Each case
runs once per checkpoint format it ships (test ids ``test_case[<format>-<case id>]``), and every adapter file
must describe itself as the manifest says. Nothing here is specific to the cases at hand: every argument is
read from the manifest. This is the only module that needs anything from outside the repository: without the
folder it is skipped as a whole, and conftest.py ends the run with a line that says how to point at it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN_DIR
from PIL import Image

from faceid.checkpoints import AdapterSpec, load_state_dict
from faceid.pipeline import FaceIDPipeline
from faceid.variants import VARIANTS, VariantSpec

FORMATS = ("bin", "safetensors")

if not (GOLDEN_DIR / "manifest.json").is_file():
    pytest.skip(f"no golden folder at {GOLDEN_DIR} (set FACEID_GOLDEN_DIR)", allow_module_level=True)

MANIFEST = json.loads((GOLDEN_DIR / "manifest.json").read_text())


def _params():
    params = []
    for case in MANIFEST["cases"]:
        for fmt in FORMATS:
            if fmt in case.get("adapter", {}):
                params.append(pytest.param(case, fmt, id=f"{fmt}-{case['id']}"))
    return params


def _variant(case: dict) -> VariantSpec | None:
    """The case's row of faceid's variant table: golden variants are named as released, less "-sd15"."""
    name = case["variant"]
    return VARIANTS.get(name) or VARIANTS.get(f"{name}-sd15")


def _adapter_params():
    return [
        pytest.param(name, fmt, id=f"{fmt}-{name}")
        for name, adapter in MANIFEST.get("adapters", {}).items()
        for fmt in FORMATS
        if fmt in adapter
    ]


def _unsupported(case: dict) -> str | None:
    """Why a case's variant cannot run (None when it can): every variant of the table is built."""
    if _variant(case) is None:
        return f"variant {case['variant']} is not in faceid's variant table (faceid.variants.VARIANTS)"
    return None


def _array(spec: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN_DIR / spec["npy"]))


def _compare(name: str, actual, expected: dict) -> str | None:
    """None when ``actual`` matches the expected array within its tolerance, else what is wrong."""
    want = np.load(GOLDEN_DIR / expected["path"])
    got = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if expected.get("exact"):
        return None if np.array_equal(got.astype(want.dtype), want) else f"{name}: {got.tolist()} != {want.tolist()}"
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    return None if diff <= expected["atol"] else f"{name}: max |diff| {diff:.3g} > atol {expected['atol']:.3g}"


def _check_all(actual: dict, case: dict) -> None:
    missing = [name for name in case["expected"] if name not in actual]
    assert not missing, f"no output computed for expected arrays {missing}"
    problems = [p for name, spec in case["expected"].items() if (p := _compare(name, actual[name], spec))]
    assert not problems, "\n".join(problems)


def _pipeline(case: dict, fmt: str) -> FaceIDPipeline:
    encoder = case.get("image_encoder")
    return FaceIDPipeline.from_pretrained(
        GOLDEN_DIR / case["base_model"],
        GOLDEN_DIR / case["adapter"][fmt],
        device="cpu",
        torch_dtype=torch.float32,
        image_encoder=GOLDEN_DIR / encoder if encoder else None,
        progress=False,
    )


def _face_arguments(case: dict, kwargs: dict) -> dict:
    """The identity arguments of ``encode`` for the reference's (faceid_embeds, face_image, shortcut, s_scale)."""
    embeds = _array(kwargs.pop("faceid_embeds"))
    # How the table says the variant combines photos: Portrait's reference takes (1, n, 512) as one
    # identity of n photos and concatenates their tokens ("concat"); the others get one photo each.
    arguments = {"face": embeds, "combine": _variant(case).combine}
    if "face_image" in kwargs:
        images = kwargs.pop("face_image")
        images = images if isinstance(images, list) else [images]
        arguments["face_image"] = [Image.open(GOLDEN_DIR / image["png"]).convert("RGB") for image in images]
    if _variant(case).needs_clip:
        # The reference's own defaults when a case does not give them (they are its classes', not the
        # variant's: IPAdapterFaceIDPlus.generate shortcut=False even for PlusV2, IPAdapterFaceIDPlusXL True).
        arguments["shortcut"] = kwargs.pop("shortcut", case["pipeline_class"] == "StableDiffusionXLPipeline")
        arguments["s_scale"] = kwargs.pop("s_scale", 1.0)
    return arguments


def _clip_arrays(conditioning) -> dict:
    clip = conditioning.clip
    if not clip:
        return {}
    return {
        "clip_pixel_values": clip["clip_pixel_values"],
        "clip_image_embeds": clip["clip_embeds"],
        "uncond_clip_image_embeds": clip["uncond_clip_embeds"],
    }


def _faces_per_identity(case: dict) -> int:
    """Portrait's reference repeats samples twice (num_samples**2 images per prompt); others once."""
    return 2 if _variant(case).architecture.name == "portrait" else 1


@pytest.mark.parametrize("name,fmt", _adapter_params())
def test_adapter_file_describes_itself(name, fmt):
    """The reference's own files: what AdapterSpec reads off the tensors is what the manifest says they are."""
    adapter = MANIFEST["adapters"][name]
    spec = AdapterSpec.from_state_dict(load_state_dict(GOLDEN_DIR / adapter[fmt]))
    proj_keys = adapter["image_proj_keys"]
    assert spec.num_tokens == adapter["num_tokens"]
    assert spec.lora_rank == adapter["lora_rank"]
    assert spec.cross_attention_dim == proj_keys["norm.weight"][0]
    plus = adapter["image_proj_class"] == "ProjPlusModel"
    assert (spec.perceiver is not None) == plus
    if plus:
        assert spec.variant == "faceid-plus"
        assert spec.perceiver.clip_dim == proj_keys["perceiver_resampler.proj_in.weight"][1]
    elif "separate" in adapter["reference_class"]:  # Portrait: the reference's faceid_separate module
        assert spec.variant == "faceid-portrait"
    else:
        assert spec.variant == "faceid"


@pytest.mark.parametrize("case,fmt", _params())
def test_case(case, fmt):
    if reason := _unsupported(case):
        pytest.skip(reason)
    torch.manual_seed(0)
    pipe = _pipeline(case, fmt)
    # The file's tensors fit the table's architecture row of the case's variant.
    assert _variant(case).architecture in pipe.adapter.spec.architectures
    if case["kind"] == "generate":
        actual = _run_generate(pipe, case)
    elif case["kind"] == "unet_call":
        actual = _run_unet_call(pipe, case)
    else:
        pytest.fail(f"unknown case kind {case['kind']!r}")
    _check_all(actual, case)


def _run_generate(pipe: FaceIDPipeline, case: dict) -> dict:
    kwargs = dict(case["generate_kwargs"])
    face = _face_arguments(case, kwargs)
    num_samples = kwargs.pop("num_samples", 4) ** _faces_per_identity(case)
    latents = _array(kwargs.pop("latents")) if "latents" in kwargs else None
    scale = kwargs.pop("scale", 1.0)
    # Unset sizes fall through to the diffusers pipeline's own default, as they do in the reference.
    default_size = pipe.pipe.unet.config.sample_size * pipe.pipe.vae_scale_factor
    width, height = kwargs.pop("width", default_size), kwargs.pop("height", default_size)
    steps = kwargs.pop("num_inference_steps", 30)
    guidance = kwargs.pop("guidance_scale", None)

    conditioning = pipe.encode(
        kwargs.pop("prompt", None),
        negative_prompt=kwargs.pop("negative_prompt", None),
        num_images_per_prompt=num_samples,
        **face,
    )
    recorded = _record(pipe)
    output = pipe(
        conditioning=conditioning,
        seed=kwargs.pop("seed", None),
        latents=latents,
        scale=scale,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type=kwargs.pop("output_type", "np"),
        callback_on_step_end=recorded.on_step_end,
        **kwargs,
    )
    recorded.detach()
    num_images = len(output.images)
    cfg = recorded.noise_preds[0].shape[0] == 2 * num_images
    actual = _clip_arrays(conditioning) | {
        "image_prompt_embeds": conditioning.identity,
        "uncond_image_prompt_embeds": conditioning.uncond_identity,
        "prompt_embeds_cfg": _context(conditioning, cfg),
        "timesteps": recorded.timesteps,
        # The UNet input is [latents] (or [latents; latents] under CFG); DDIM does not rescale it.
        "latents_per_step": torch.stack([x[:num_images] for x in recorded.unet_inputs]),
        "noise_pred_per_step": torch.stack(recorded.noise_preds),
        "vae_decode_input": recorded.vae_inputs[0],
        "images": output.images,
    }
    if recorded.added_cond:
        actual["add_text_embeds_cfg"] = recorded.added_cond[0]["text_embeds"]
        actual["add_time_ids_cfg"] = recorded.added_cond[0]["time_ids"]
    return actual


def _context(conditioning, cfg: bool) -> torch.Tensor:
    """The reference's prompt embeddings: text tokens followed by identity tokens, uncond half first."""
    text = conditioning.pipe_kwargs["prompt_embeds"]
    if cfg:
        text = torch.cat([conditioning.pipe_kwargs["negative_prompt_embeds"], text])
    return torch.cat([text, conditioning.identity_states(cfg)], dim=1)


class _Recorder:
    """Hooks that record what the pipeline feeds its UNet and VAE at every step."""

    def __init__(self, pipe: FaceIDPipeline):
        self.unet_inputs, self.noise_preds, self.vae_inputs, self.added_cond = [], [], [], []
        unet, vae = pipe.pipe.unet, pipe.pipe.vae
        self._handle = unet.register_forward_hook(self._on_unet, with_kwargs=True)
        self._vae, self._decode = vae, vae.decode

        def decode(z, *args, **kw):
            self.vae_inputs.append(z.detach().clone())
            return self._decode(z, *args, **kw)

        vae.decode = decode

    def on_step_end(self, pipeline, step, timestep, callback_kwargs):
        """A step callback: the timesteps of the call's own scheduler (each call has one; the pipeline's stays
        as loaded)."""
        self.timesteps = pipeline.scheduler.timesteps.clone()
        return callback_kwargs

    def _on_unet(self, module, args, kwargs, output):
        self.unet_inputs.append((args[0] if args else kwargs["sample"]).detach().clone())
        self.noise_preds.append(output[0].detach().clone())
        if kwargs.get("added_cond_kwargs"):
            self.added_cond.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})

    def detach(self):
        self._handle.remove()
        self._vae.decode = self._decode


def _record(pipe):
    return _Recorder(pipe)


def _run_unet_call(pipe: FaceIDPipeline, case: dict) -> dict:
    inputs = dict(case["unet_inputs"])
    face = _face_arguments(case, inputs)
    conditioning = pipe.encode(inputs.get("prompt"), negative_prompt=inputs.get("negative_prompt"), **face)
    text = torch.cat([conditioning.pipe_kwargs["negative_prompt_embeds"], conditioning.pipe_kwargs["prompt_embeds"]])
    identity = conditioning.identity_states(classifier_free_guidance=True)
    latent = _array(inputs["latent"])
    unet_kwargs = {}
    if "pooled_prompt_embeds" in conditioning.pipe_kwargs:  # SDXL: pooled text + size conditioning
        pooled = torch.cat(
            [
                conditioning.pipe_kwargs["negative_pooled_prompt_embeds"],
                conditioning.pipe_kwargs["pooled_prompt_embeds"],
            ]
        )
        h, w = inputs["height"], inputs["width"]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * latent.shape[0], dtype=pooled.dtype)
        unet_kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    actual = {f"add_{k}": v for k, v in unet_kwargs.get("added_cond_kwargs", {}).items()} | _clip_arrays(conditioning)
    actual |= {
        "text_embeds_cfg": text,
        "image_prompt_embeds": conditioning.identity,
        "uncond_image_prompt_embeds": conditioning.uncond_identity,
        "encoder_hidden_states": torch.cat([text, identity], dim=1),
    }
    adapter = pipe.adapter
    for setting in case["settings"]:
        adapter.set_scale(setting["ip_scale"])
        adapter.set_lora_scale(1.0 if setting.get("lora_scale") is None else setting["lora_scale"])
        with torch.no_grad():
            actual[setting["expected"]] = pipe.pipe.unet(
                latent,
                torch.tensor(inputs["timestep"]),
                encoder_hidden_states=text,
                cross_attention_kwargs={"ip_hidden_states": identity},
                **unet_kwargs,
            ).sample
    return actual
