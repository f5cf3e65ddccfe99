"""The generation settings on the command line: one flag per ``GenerationSettings`` field, built from the field's
declaration (its type, help and ``json_schema_extra`` flag), the flags that set ``regions`` and ``style`` together
with their images, the flag value types (``FILE:WEIGHT``, whole numbers), and ``settings_from_args``, the settings
a command line asks for."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..combos import COMBOS
from ..errors import FaceIDError
from ..variants import DEFAULT_ADAPTER, VARIANTS

#: ``--style-adapter`` when neither it nor a settings file nor ``--combo`` names one.
DEFAULT_STYLE_ADAPTER = "plus-face"


#: ``--combo``'s adapter without ``--adapter``: the release for the family of faceid's default adapter.
COMBO_FAMILY = VARIANTS[DEFAULT_ADAPTER].family


# Settings whose flags say more than their value: they come with images (add_reference_arguments).
REFERENCE_FIELDS = ("regions", "style")


# What --regions takes for boxes (anything else names a photo): numbers, commas and semicolons.
_BOXES = re.compile(r"[\d\s.,;eE+-]+")


def add_settings_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of ``GenerationSettings``, built from the field's declaration (type, help, flag).

    Every flag defaults to None ("not given"), so that a settings file and the family defaults can fill
    what the command line leaves open.
    """
    import typing

    from ..settings import GenerationSettings

    for name, field in GenerationSettings.model_fields.items():
        if name in exclude:
            continue
        cli = (field.json_schema_extra or {}).get("cli")
        if cli is None:  # a field with flags of its own (REFERENCE_FIELDS: they come with images)
            continue
        kwargs: dict = {"dest": name, "default": None, "help": _help(field.description, cli.get("default"))}
        kwargs.update({key: cli[key] for key in ("metavar", "nargs", "const") if key in cli})
        # (An Annotated type counts as the type it annotates: a validated window is still a tuple. A Literal alone,
        # not in a union, is one kind: its arguments are its values.)
        members = () if typing.get_origin(field.annotation) is typing.Literal else typing.get_args(field.annotation)
        kinds = {
            typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
            for a in members
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

    from ..settings import GenerationSettings

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
    regions, _ = regions_flags(args)
    if regions is not None:
        given["regions"] = regions
    style = _style_records(args, base.get("style") or [])
    if style:
        given["style"] = style
    combo = combo_of(args)
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
    from ..settings import StyleSetting

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


def combo_of(args: argparse.Namespace):
    name = getattr(args, "combo", None)
    return None if name is None else COMBOS[name]


def regions_flags(args: argparse.Namespace) -> tuple[str | list | None, object]:
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
    from ..groups import check_box

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


def reference_images(args: argparse.Namespace) -> list[str]:
    """The reference images of a command line, in the order of their ``style`` records: every ``--style``,
    then the ``--combo``'s, which reads the first face photo."""
    images = [path_and_number(item)[0] for item in getattr(args, "style", None) or []]
    combo = combo_of(args)
    return images + ([args.face[0]] if combo is not None else [])


def _style_records(args: argparse.Namespace, recorded: list[dict]) -> list[dict]:
    """The ``style`` records of ``--style`` and ``--combo``. A scale, window or adapter the flags leave open
    comes from the settings file's record at the same place (``recorded``), so that ``--settings IMAGE.png
    --style IMAGE`` makes the image again."""
    if not hasattr(args, "style"):  # a command without --style (serve's --style-adapter is its allowlist)
        return []
    scales = [path_and_number(item)[1] for item in args.style or []]
    combo = combo_of(args)
    if not scales and combo is None:
        for flag in ("--style-adapter", "--style-window"):
            if getattr(args, flag[2:].replace("-", "_"), None) is not None:
                raise FaceIDError(f"{flag} goes with --style IMAGE[:SCALE] (or --combo), the images it applies to")
        return []
    from ..references import reference_name, style_records

    source = _style_adapter_source(args, recorded, combo)
    return style_records(
        scales,
        reference_name(source),
        window=args.style_window,
        recorded=recorded,
        combo_scale=None if combo is None else combo.reference_scale,
    )


def _style_adapter_source(args: argparse.Namespace, recorded: list[dict], combo) -> str:
    """What ``--style-adapter`` loads: as given; else the adapter the settings file's references name (a kind;
    a file must be given again); else the combination's, or plus-face."""
    from ..references import REFERENCE_ADAPTERS

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


def tiny_vae_defaults(settings):
    """``--tiny-vae`` alone decodes with it; ``--decoder tiny`` alone loads the family's released tiny VAE."""
    if settings.tiny_vae is not None and settings.decoder is None:
        return settings.replace(decoder="tiny")
    if settings.decoder == "tiny" and settings.tiny_vae is None:
        return settings.replace(tiny_vae="auto")
    return settings


def path_and_number(text: str) -> tuple[str, float | None]:
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
    path, weight = path_and_number(item)
    return path, 1.0 if weight is None else weight


def int_at_least(minimum: int):
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


# ---- --ray (faceid prepare and faceid eval: batch work on Ray Data)


def add_ray_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``, shared by ``faceid prepare`` and ``faceid eval``."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"run {what} as a Ray Data pipeline, on --workers actors (a GPU each when the cluster has GPUs): on "
        "a local Ray instance, or on the cluster at ADDRESS (auto, or ray://HOST:PORT; every machine must see the "
        "same paths)",
    )


def ray_workers(args: argparse.Namespace, workers: int):
    """The :class:`~faceid.ray_data.RayWorkers` of ``--ray`` (None without it)."""
    if getattr(args, "ray", None) is None:
        return None
    from ..ray_data import RayWorkers

    return RayWorkers(address=args.ray or None, workers=workers)


def ray_session(workers):
    """Ray joined (or started) for a command's whole run when ``workers`` (from :func:`ray_workers`) is given; a
    context that does nothing otherwise."""
    import contextlib

    if workers is None:
        return contextlib.nullcontext()
    import logging

    from ..ray_data import ray_session as session

    try:
        import ray.data  # noqa: F401 - it sets up its loggers on import: quiet them after that
    except ImportError:
        pass  # ray_session says what to install
    else:
        if logging.getLogger("faceid").getEffectiveLevel() > logging.DEBUG:  # --debug keeps them
            logging.getLogger("ray.data").setLevel(logging.ERROR)
    return session(workers.address)
