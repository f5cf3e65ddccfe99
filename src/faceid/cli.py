"""The ``faceid`` command line: thin wrappers over the Python API.

Every failure a user can cause ends as one line on stderr and a non-zero exit status (2 for bad
input, 1 for anything unexpected; ``--debug`` shows the traceback). Work that can fail (reading the
photo, finding the face, loading the models) happens before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import FaceIDError

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries(args.debug)
    try:
        return args.func(args) or 0
    except FaceIDError as exc:
        # One line whatever the message (some carry a library's multi-line text).
        print("faceid: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceid: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug or an environment problem: one line, traceback on request
        if args.debug:
            raise
        print(f"faceid: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceid", description="Identity-preserving image generation (IP-Adapter-FaceID)."
    )
    parser.add_argument("--version", action="version", version=f"faceid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    commands = parser.add_subparsers(title="commands")

    gen = commands.add_parser("generate", help="images of the person in a face photo, as a prompt describes")
    gen.add_argument(
        "--face",
        required=True,
        action="append",
        help="photo of the person (the largest face is used); repeat for several photos of the same person",
    )
    gen.add_argument(
        "--settings",
        default=None,
        metavar="FILE",
        help="take every generation setting from a PNG made by faceid (reproduces it) or a JSON file; "
        "flags given as well win",
    )
    add_settings_arguments(gen)
    gen.add_argument("--vae", default=None, help="VAE to use instead of the base model's (folder or Hub repo id)")
    gen.add_argument(
        "--base-config",
        default=None,
        help="single-file base model offline: a diffusers folder of the same architecture for its configuration",
    )
    gen.add_argument("--face-models", default=None, help="folder with the face detector and recognizer (buffalo_l)")
    gen.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--fuse-lora", action="store_true", help="merge the identity LoRA into the UNet (faster)")
    gen.add_argument(
        "--best-of",
        type=int,
        default=1,
        metavar="K",
        help="generate K candidates per image and keep the ones most like the person (scores in the PNGs)",
    )
    gen.add_argument(
        "--best-of-clip",
        default=None,
        metavar="MODEL",
        help="CLIP model (Hub id or folder) to break identity-score ties by prompt fidelity (CLIP-T)",
    )
    gen.add_argument("--image-encoder", default=None, help="Plus only: CLIP ViT-H image encoder folder or repo")
    gen.add_argument("--out", required=True, help="folder for the images and the contact sheet")
    gen.set_defaults(func=cmd_generate)

    models = commands.add_parser(
        "models", help="list the released models by name, or say what adapter checkpoint files are"
    )
    models.add_argument("checkpoints", nargs="*", help="adapter files (.bin/.safetensors) to describe")
    models.set_defaults(func=cmd_models)

    prep = commands.add_parser("prepare", help="turn a folder of captioned photos into a training dataset")
    from .data import add_prepare_arguments

    add_prepare_arguments(prep)
    prep.set_defaults(func=cmd_prepare)

    train = commands.add_parser(
        "train",
        help="train or fine-tune an adapter on a prepared dataset (multi-GPU: `accelerate launch -m faceid.cli train`)",
    )
    train.add_argument("--config", default=None, help="YAML/JSON file of training settings (configs/*.yaml)")
    for flag, kind, text in (
        ("--base-model", str, "SD1.5/SDXL base model (Hub repo id or diffusers folder)"),
        ("--dataset", str, "folder written by `faceid prepare`"),
        ("--output-dir", str, "where checkpoints, logs and the exported adapter go"),
        ("--variant", str, "faceid | plus | portrait"),
        ("--init-adapter", str, "start from this adapter checkpoint (fine-tuning)"),
        ("--image-encoder", str, "Plus: CLIP ViT-H image encoder folder or repo"),
        ("--max-train-steps", int, "optimizer steps"),
        ("--train-batch-size", int, "images per device per step"),
        ("--gradient-accumulation-steps", int, "micro-batches per optimizer step"),
        ("--learning-rate", float, "AdamW learning rate (1e-4)"),
        ("--resolution", int, "training resolution (512)"),
        ("--lora-rank", int, "identity LoRA rank (128)"),
        ("--mixed-precision", str, "no | fp16 | bf16"),
        ("--checkpointing-steps", int, "save a checkpoint every N steps"),
        ("--validation-steps", int, "validate every N steps (0: never)"),
        ("--face-models", str, "face detector + recognizer folder for validation"),
        ("--report-to", str, "tensorboard | none"),
        ("--seed", int, "seed of the data order, noise and dropout"),
    ):
        train.add_argument(flag, type=kind, default=None, help=text)
    train.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in the output folder")
    train.add_argument("--validation-face", action="append", default=None, help="photo to validate on (repeatable)")
    train.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save memory")
    train.add_argument("--use-8bit-adam", action="store_true", default=None, help="bitsandbytes AdamW8bit")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting of TrainConfig"
    )
    train.set_defaults(func=cmd_train)

    from .evaluate import add_eval_arguments, add_score_arguments, run_eval_command, run_score_command

    ev = commands.add_parser(
        "eval", help="generate identities x prompts x seeds (x scales), score likeness and prompt fidelity, report"
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval_command)
    sc = commands.add_parser("score", help="score existing images against a reference face")
    add_score_arguments(sc)
    sc.set_defaults(func=run_score_command)

    emb = commands.add_parser("embed", help="find the faces in a photo; save the embedding and aligned crop")
    emb.add_argument("photo", help="a photo with a face")
    emb.add_argument("--face-index", type=int, default=0, help="which face to save (0 = largest)")
    emb.add_argument("--face-models", default=None, help="folder with the face detector and recognizer (buffalo_l)")
    emb.add_argument("--out", default=".", help="folder for <photo>_face<k>.npy and .png (default: here)")
    emb.set_defaults(func=cmd_embed)
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ``GenerationSettings``, built from the field's declaration (type, help, flag).

    Every flag defaults to None ("not given"), so that a settings file and the family defaults can fill
    what the command line leaves open.
    """
    import typing

    from .settings import GenerationSettings

    for name, field in GenerationSettings.model_fields.items():
        cli = (field.json_schema_extra or {})["cli"]
        kwargs: dict = {"dest": name, "default": None, "help": _help(field.description, cli.get("default"))}
        if "metavar" in cli:
            kwargs["metavar"] = cli["metavar"]
        kinds = {a for a in typing.get_args(field.annotation) if a is not type(None)} or {field.annotation}
        literal = next((a for a in kinds if typing.get_origin(a) is typing.Literal), None)
        if literal is not None:
            kwargs["choices"] = typing.get_args(literal)
        elif bool in kinds:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif any(typing.get_origin(a) is tuple for a in kinds):
            kwargs.update(nargs=2, type=float)
        elif any(typing.get_origin(a) is dict for a in kinds):
            kwargs.update(action="append", type=_lora_argument)
        elif int in kinds:
            kwargs["type"] = int
        elif float in kinds:
            kwargs["type"] = float
        parser.add_argument(*cli["flags"], **kwargs)


def _help(description: str | None, default) -> str:
    text = description or ""
    return f"{text} (default {default})" if default is not None else text


def settings_from_args(args: argparse.Namespace):
    """The generation settings a command line asks for: a ``--settings`` file, then the flags given."""
    import json

    from .settings import GenerationSettings

    base: dict = {}
    if getattr(args, "settings", None):
        path = Path(args.settings)
        if not path.is_file():
            raise FaceIDError(f"settings file not found: {path}")
        if path.suffix.lower() == ".png":
            base = GenerationSettings.from_png(path).model_dump(exclude_unset=True)
        else:
            try:
                base = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise FaceIDError(f"{path} is not a JSON file of generation settings ({exc})") from None
    if isinstance(base.get("seed"), list):  # the CLI numbers images from one seed: image i has seed + i
        base["seed"] = base["seed"][0]
    given = {
        name: getattr(args, name) for name in GenerationSettings.model_fields if getattr(args, name, None) is not None
    }
    if "loras" in given:
        given["loras"] = dict(given["loras"])
    if "num_images_per_prompt" not in given and "num_images_per_prompt" not in base:
        cli = GenerationSettings.model_fields["num_images_per_prompt"].json_schema_extra["cli"]
        given["num_images_per_prompt"] = cli["default"]
    return GenerationSettings.parse(base, **given)


def _face_analyzer(face_models: str | None):
    from .faces import FaceAnalyzer

    return FaceAnalyzer.from_dir(face_models) if face_models else FaceAnalyzer.from_pretrained()


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .faces import select_face
    from .images import source_name

    analyzer = _face_analyzer(args.face_models)
    faces = analyzer.analyze(args.photo)  # once: listing and choosing use the same result
    for i, found in enumerate(faces):
        x1, y1, x2, y2 = (round(float(v)) for v in found.box)
        marker = "*" if i == args.face_index else " "
        print(f"{marker} face {i}: box=({x1}, {y1}, {x2}, {y2}) size={x2 - x1}x{y2 - y1} score={found.score:.3f}")
    face = select_face(faces, args.face_index, source_name(args.photo))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.photo).stem}_face{args.face_index}"
    np.save(out / f"{stem}.npy", face.embedding.astype(np.float32))
    Image.fromarray(face.aligned).save(out / f"{stem}.png")
    print(f"saved {out / (stem + '.npy')} ({face.embedding.shape[0]}-d, L2-normalised) and {out / (stem + '.png')}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .variants import ADAPTER_REPO, ADAPTER_REVISION, VARIANTS

    if not args.checkpoints:
        print(f"Released models (files in {ADAPTER_REPO}, pinned to commit {ADAPTER_REVISION[:7]} and sha256-checked):")
        print(f"{'name':<26} {'base':<6} {'needs':<24} file (+ the LoRA alone, where released)")
        pad = " " * 34
        for v in VARIANTS.values():
            needs = ["face photo(s)" if v.combine == "concat" else "face photo"]
            if v.image_encoder:
                needs.append("CLIP ViT-H")
            twin = f" (+ {v.lora.filename})" if v.lora else ""
            print(f"{v.name:<26} {v.family:<6} {' + '.join(needs):<24} {v.adapter.filename}{twin}")
            lora = f"LoRA rank {v.lora_rank}" if v.lora_rank else "no LoRA"
            print(f"{pad}{v.description} ({v.tokens_per_face} tokens per photo, {lora})")
            print(f"{pad}base model {v.base_model}" + (f", VAE {v.vae}" if v.vae else ""))
            pinned = [v.adapter.revision[:7] if v.adapter.revision else "main (not pinned)"]
            pinned.append(f"sha256 {v.adapter.sha256[:12]}..." if v.adapter.sha256 else "no sha256 (not checked)")
            encoder = (
                v.image_encoder and f"; image encoder {v.image_encoder}@{(v.image_encoder.revision or 'main')[:7]}"
            )
            print(f"{pad}pinned: {', '.join(pinned)}{encoder or ''}")
        print("\nUse a name with --adapter; files from anywhere work too (`faceid models FILE` says what one is).")
        return 0
    from .checkpoints import AdapterSpec, load_state_dict
    from .variants import released, releases_like

    for path in args.checkpoints:
        spec = AdapterSpec.from_state_dict(load_state_dict(path), Path(path).name)
        release = released(path)
        fits = spec.architectures
        if release:
            named = f"; released as {release.name}"
        elif fits:
            like = releases_like(fits, spec.family)  # none for a family without releases
            named = f"; variant {' or '.join(a.name for a in fits)}"
            named += f" (like {', '.join(v.name for v in like)})" if like else ""
        else:
            named = "; fits no released variant exactly (a layout of its own)"
        if len(fits) > 1 and not release:
            named += "; Plus and PlusV2 have the same tensors: the file cannot tell them apart (--shortcut chooses)"
        print(f"{path}: {spec.describe()}{named}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import run_prepare

    return run_prepare(args)


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from .train import TrainConfig, Trainer

    overrides = {
        key: getattr(args, key)
        for key in (
            "base_model",
            "dataset",
            "output_dir",
            "variant",
            "init_adapter",
            "image_encoder",
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "resolution",
            "lora_rank",
            "mixed_precision",
            "checkpointing_steps",
            "validation_steps",
            "face_models",
            "report_to",
            "seed",
            "gradient_checkpointing",
            "use_8bit_adam",
        )
    }
    overrides["resume_from_checkpoint"] = args.resume
    overrides["validation_faces"] = args.validation_face
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise FaceIDError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    config = TrainConfig.from_file(args.config, **overrides)
    result = Trainer(config).train()
    if not result["stopped"] and result["is_main_process"]:
        processes = result["num_processes"]
        print(
            f"trained {result['global_step']} steps on {processes} process{'es' if processes > 1 else ''} "
            f"({result['samples_per_second']:.2f} samples/s); "
            f"adapter written to {config.output_dir}/{config.export_name}.bin and .safetensors"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .outputs import contact_sheet, save_png
    from .pipeline import FaceIDPipeline
    from .variants import DEFAULT_ADAPTER

    settings = settings_from_args(args)  # bad settings fail here, before anything loads
    if settings.prompt is None:
        raise FaceIDError("give --prompt (or --settings FILE with a prompt)")
    if not isinstance(settings.prompt, str):
        raise FaceIDError("faceid generate takes one prompt; use the Python API for several")
    if args.best_of < 1:
        raise FaceIDError("--best-of must be at least 1")
    # The faces first: a photo without a usable face fails in seconds, before the big models load.
    analyzer = _face_analyzer(args.face_models)
    faces = [analyzer.get(photo, index=settings.face_index) for photo in args.face]
    pipe = FaceIDPipeline.from_pretrained(
        settings.base_model,
        settings.adapter or DEFAULT_ADAPTER,
        vae=args.vae,
        single_file_config=args.base_config,
        device=args.device,
        torch_dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        lora_scale=1.0 if settings.lora_scale is None else settings.lora_scale,
        fuse_lora=args.fuse_lora,
        face_analyzer=analyzer,
        image_encoder=args.image_encoder,
        shortcut=settings.shortcut,
        loras=list((settings.loras or {}).items()),
    )
    first_seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    n = settings.num_images_per_prompt
    # One identity (this prompt's), from every photo given; encoded once for every round of best-of.
    conditioning = pipe.encode(face=[faces], settings=settings.replace(seed=None))
    images, seeds, run = [], [], None
    for round_ in range(args.best_of):  # batches of n: best-of-K needs no K-times larger batch
        batch_seeds = [first_seed + round_ * n + i for i in range(n)]
        result = pipe(conditioning=conditioning, settings=settings.replace(seed=batch_seeds))
        images += result.images
        seeds += batch_seeds
        run = result.settings
    scores = [{} for _ in images]
    if args.best_of > 1:
        images, seeds, scores = _keep_best(images, seeds, faces, analyzer, args, run.prompt, n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.face[0]).stem
    written = []
    for image, image_seed, image_scores in zip(images, seeds, scores, strict=True):
        # What reproduces this image alone (`faceid generate --settings IMAGE.png --face ...`), and what it shows.
        metadata = {
            **run.replace(seed=image_seed, num_images_per_prompt=1).to_json(),
            "face": ", ".join(str(f) for f in args.face),
            "best_of": args.best_of if args.best_of > 1 else None,
            "faceid_version": __version__,
            **image_scores,
        }
        written.append(save_png(image, _free_path(out / f"{stem}_s{image_seed}.png"), metadata))
    labels = [
        f"seed {s}" + (f"  id {sc['identity_similarity']:.2f}" if sc else "")
        for s, sc in zip(seeds, scores, strict=True)
    ]
    sheet = contact_sheet(images, reference=faces[0].aligned, labels=labels)
    sheet_path = _free_path(out / f"contact_sheet_s{first_seed}.png")
    sheet.save(sheet_path)
    for path in written:
        print(path)
    print(f"contact sheet: {sheet_path}")
    return 0


def _keep_best(images, seeds, faces, analyzer, args, prompt, keep):
    """The ``keep`` candidates most like the person (ties by CLIP-T), with their scores for the PNGs."""
    import numpy as np

    from .evaluate import best_of
    from .scoring import ClipTextScorer, IdentityScorer

    reference = np.mean([f.embedding for f in faces], axis=0)
    reference = reference / np.linalg.norm(reference)
    clip = ClipTextScorer(args.best_of_clip) if args.best_of_clip else None
    picked = best_of(images, reference, IdentityScorer(analyzer), clip, prompt, keep=keep)
    kept_scores = []
    for rank, (_, score) in enumerate(picked):
        kept_scores.append({
            "identity_similarity": round(score.similarity, 6),
            "identity_recognizer": score.recognizer,
            "no_face": score.no_face,
            "clip_t": None if score.clip_t is None else round(score.clip_t, 6),
            "best_of_rank": rank,
        })  # fmt: skip
    return [images[s.index] for _, s in picked], [seeds[s.index] for _, s in picked], kept_scores


def _lora_argument(item: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT``."""
    path, sep, weight = item.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def _free_path(path: Path) -> Path:
    """``path``, or ``name-1.png``, ``name-2.png``... if taken: never overwrite earlier results."""
    candidate, k = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def _quiet_libraries(debug: bool) -> None:
    """Library chatter (deprecations, backend notices) is not for CLI users; progress bars stay."""
    if debug:
        return
    warnings.filterwarnings("ignore")
    # Read by diffusers and transformers when they are first imported (they reset their loggers then).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "huggingface_hub", "faceid"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
