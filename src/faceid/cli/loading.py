"""The flags that say how the models load, for every command that loads a pipeline, and the ``FaceIDPipeline``
and face analyzer they load."""

from __future__ import annotations

import argparse

from ..errors import FaceIDError
from ..variants import DEFAULT_ADAPTER
from .logs import quiet_model_loading

#: ``--dtype`` choices -> torch dtype names (looked up on torch when a command runs: --help needs no torch).
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


FACE_MODELS_HELP = (
    "folder with the face detector and recognizer (buffalo_l: det_10g.onnx, w600k_r50.onnx); "
    "default: faceid's cache, downloaded once"
)


def add_model_loading_arguments(
    parser: argparse.ArgumentParser,
    *,
    several_devices: bool = False,
    single_file: bool = True,
    face_models: bool = True,
    fast_lora: bool = True,
) -> None:
    """The flags that say how the models load, for every command that loads a pipeline (what to draw comes
    from ``GenerationSettings``). ``several_devices``: ``--device`` repeats, one worker per device."""
    if single_file:
        parser.add_argument(
            "--base-config",
            default=None,
            help="single-file base model offline: a diffusers folder of the same architecture for its configuration",
        )
    if face_models:
        parser.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    parser.add_argument("--image-encoder", default=None, help="Plus only: CLIP ViT-H image encoder folder or repo")
    if several_devices:
        parser.add_argument(
            "--device",
            action="append",
            default=None,
            help="cuda, cuda:1, cpu, mps (default: the best available); repeat for one generation worker per device",
        )
    else:
        parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    if fast_lora:
        parser.add_argument(
            "--fast-lora",
            default=None,
            metavar="FILE",
            help="with --fast: a local copy of the preset's LoRA file (default: the pinned Hub file, downloaded once)",
        )
    parser.add_argument(
        "--offload",
        choices=("model", "sequential"),
        default=None,
        help="FLUX.1 (--adapter none): keep the models on the CPU and move each to the GPU while it runs (model), or "
        "each layer (sequential: slowest, least GPU memory); CUDA only",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "fp8"),
        default=None,
        help="FLUX.1 (--adapter none): 8-bit weights of the transformer and T5 (optimum-quanto), about half the "
        "memory of bfloat16",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (max-autotune + channels_last on CUDA): faster steps after a slow first call "
        "(minutes for SDXL); a new image size or batch size compiles again, other settings do not",
    )


def load_face_analyzer(face_models: str | None, method: str = "faceid"):
    """The face analyzer of every command: the ``--face-models`` folder, else buffalo_l from the cache; with the
    recognizer of identity method ``method``'s pack too (antelopev2 for InstantID), from the same folder or the
    cache, refused with what to download when it is not there (nothing is downloaded for it)."""
    from ..faces import FaceAnalyzer
    from ..faces.model_files import face_pack_ready
    from ..methods import identity_method

    pack = identity_method(method).face_pack
    if pack != "buffalo_l":
        face_pack_ready(pack, face_models or None, what=f"method {method}")
    analyzer = FaceAnalyzer.from_pretrained(face_models or None)
    return analyzer if pack == "buffalo_l" else analyzer.with_pack(pack, face_models or None)


def add_method_weights_argument(group) -> None:
    """``--method-weights NAME[=FOLDER]``, as generate and eval take it (serve's says what a server does with it)."""
    group.add_argument(
        "--method-weights",
        action="append",
        default=None,
        metavar="NAME[=FOLDER]",
        help="load identity method NAME's released files from FOLDER, in their Hub layout (instantid: a folder "
        "with InstantX/InstantID's ip-adapter.bin and ControlNetModel/; pulid: a folder with pulid_v1.1.safetensors, "
        "EVA02_CLIP_L_336_psz14_s6B.pt and parsing_bisenet.pth; infiniteyou: ByteDance/InfiniteYou's "
        "infu_flux_v1.0/ or one model set in it, aes_stage2 or sim_stage1; pulid-flux: a folder with "
        "pulid_flux_v0.9.1.safetensors and pulid's other two files); NAME alone: its released files downloaded at "
        "their pinned commits and sha256-checked (instantid, pulid, pulid-flux; the default for --method's own); "
        "repeatable",
    )


def method_weights(args: argparse.Namespace, method: str) -> dict[str, str | None]:
    """``--method-weights NAME[=FOLDER]`` as {name: folder, or None for the released files fetched at their pins},
    checked before anything loads. The call's method (other than faceid) is among them: given, else its pinned
    files; a method whose files are not all pinned (InfiniteYou) needs its folder."""
    from ..methods import identity_method, refuse_unwired

    refuse_unwired(identity_method(method))  # not wired: weights would not help, so say that first
    weights: dict[str, str | None] = {}
    for item in getattr(args, "method_weights", None) or []:
        name, sep, folder = item.partition("=")
        if not name or (sep and not folder):
            raise FaceIDError(
                f"--method-weights {item!r}: give --method-weights NAME=FOLDER, e.g. instantid=checkpoints, or NAME "
                "alone for its released files"
            )
        identity_method(name)  # a known method, or the list
        weights[name] = folder or _pinned_method(name, f"--method-weights {name}")
    if method != "faceid" and method not in weights:
        weights[method] = _pinned_method(method, f"--method {method}")
    return weights


def _pinned_method(name: str, given: str) -> None:
    """None (fetch the released files at their pins) for a method whose files the table pins; else the error that
    asks for its folder (``given``: the flag that named the method without one)."""
    from ..methods import identity_method

    method = identity_method(name)
    if method.unpinned:
        raise FaceIDError(
            f"{given} needs --method-weights {name}=FOLDER: the folder of its released files "
            f"({', '.join(f.path_in_repo for f in method.files_for())} from {method.files_for()[0].repo}, in their "
            "layout); faceid cannot download them itself, their commits and sha256 are not in its method table"
        )
    return None


def load_pipeline(
    args: argparse.Namespace,
    settings,
    analyzer,
    fuse_lora: bool = False,
    *,
    fuse_when_compiled: bool = True,
    progress: bool = True,
):
    """The ``FaceIDPipeline`` the model flags and settings describe (with the command's face analyzer), and the
    few-step LoRA of ``--fast-lora``. ``fuse_when_compiled``: with ``--compile``, fuse the identity LoRA when its
    weight is fixed."""
    import torch

    from ..pipeline import FaceIDPipeline

    quiet_model_loading()
    if without_faceid_adapter(settings):
        return FaceIDPipeline.from_pretrained(
            settings.base_model,
            None,
            vae=settings.vae,
            device=args.device,
            torch_dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
            face_analyzer=analyzer,
            progress=progress,
            methods=method_weights(args, settings.method),
            offload=getattr(args, "offload", None),
            quantize=getattr(args, "quantize", None),
            compile=args.compile,
        )
    pipe = FaceIDPipeline.from_pretrained(
        settings.base_model,
        settings.adapter or DEFAULT_ADAPTER,
        vae=settings.vae,
        tiny_vae=settings.tiny_vae,
        single_file_config=getattr(args, "base_config", None),  # eval has no single-file flag
        device=args.device,
        torch_dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        lora_scale=1.0 if settings.lora_scale is None else settings.lora_scale,
        # Compiled, the identity LoRA is fused when its weight is fixed (no window switching it, and no
        # stacked LoRA on the same layers): no LoRA matmuls in the graph.
        fuse_lora=fuse_lora
        or (
            fuse_when_compiled
            and args.compile
            and settings.identity_window is None
            and not settings.loras
            and settings.method == "faceid"  # another method's calls put the identity LoRA at 0
        ),
        compile=args.compile,
        face_analyzer=analyzer,
        image_encoder=args.image_encoder,
        shortcut=settings.shortcut,
        loras=list((settings.loras or {}).items()),
        progress=progress,
        methods=method_weights(args, settings.method),
    )
    _load_fast_lora(pipe, settings, args)
    return pipe


def without_faceid_adapter(settings) -> bool:
    """Whether the command loads its base model without a FaceID adapter: ``--adapter none``, or a base model of a
    family the FaceID adapters are not made for (FLUX.1), read from its ``model_index.json``."""
    if settings.adapter is not None:
        return settings.adapter.lower() == "none"
    if settings.base_model is None:
        return False
    from ..families import family_of_pipeline
    from ..model_set import pipeline_index

    try:
        found = family_of_pipeline(pipeline_index(settings.base_model).get("_class_name", ""))
    except FaceIDError:
        return False  # a single file or a missing model: the FaceID load says what is wrong
    return found is not None and not found.faceid_adapters


def _load_fast_lora(pipe, settings, args: argparse.Namespace) -> None:
    """``--fast-lora FILE``: the preset's LoRA from a local copy instead of the Hub."""
    if getattr(args, "fast_lora", None) is None:
        return
    if settings.fast is None:
        raise FaceIDError("--fast-lora goes with --fast PRESET (the preset whose LoRA the file is)")
    pipe.load_fast_lora(settings.fast, args.fast_lora)
