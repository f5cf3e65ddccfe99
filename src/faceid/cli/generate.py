"""``faceid generate``: images of the person in face photos, as a prompt describes; with img2img, inpainting,
ControlNets, several people in one picture and style references. Every input is checked before the models load."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from ..control import KINDS as CONTROL_KINDS
from ..errors import FaceIDError
from .flags import (
    add_reference_arguments,
    add_settings_arguments,
    combo_of,
    path_and_number,
    reference_images,
    regions_flags,
    settings_from_args,
    tiny_vae_defaults,
)
from .loading import (
    add_method_weights_argument,
    add_model_loading_arguments,
    load_face_analyzer,
    load_pipeline,
    method_weights,
)

logger = logging.getLogger("faceid")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid generate``."""
    parser.add_argument(
        "--face",
        required=True,
        action="append",
        help="photo of the person (the largest face is used); repeat for several photos of the same person, or, "
        "with --regions or --region-mask, once per person in the picture (person k goes to region k)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        metavar="FILE",
        help="take every generation setting from a PNG made by faceid (reproduces it) or a JSON file; "
        "flags given as well win",
    )
    add_settings_arguments(parser)
    add_model_loading_arguments(parser)
    parser.add_argument("--fuse-lora", action="store_true", help="merge the identity LoRA into the UNet (faster)")
    parser.add_argument(
        "--best-of",
        type=int,
        default=1,
        metavar="K",
        help="generate K candidates per image and keep the ones most like the person (scores in the PNGs)",
    )
    parser.add_argument(
        "--best-of-clip",
        default=None,
        metavar="MODEL",
        help="CLIP model (Hub id or folder) to break identity-score ties by prompt fidelity (CLIP-T)",
    )
    parser.add_argument("--out", required=True, help="folder for the images and the contact sheet")
    parser.add_argument(
        "--preview-every",
        type=int,
        default=None,
        metavar="K",
        help="save a preview of every image every K steps and at the last step (NAME_sSEED-step003.png), decoded "
        "by the tiny VAE when one is loaded (--tiny-vae), else by the VAE",
    )
    parser.add_argument("--preview-dir", default=None, metavar="DIR", help="folder for the previews (default: --out)")
    modes = parser.add_argument_group("pose, composition and editing")
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
    add_reference_arguments(parser.add_argument_group("several people and style references"))
    methods = parser.add_argument_group("identity methods beside FaceID (--method)")
    add_method_weights_argument(methods)
    methods.add_argument(
        "--kps",
        default=None,
        metavar="PHOTO",
        help="--method instantid: the photo whose face keypoints (pose) IdentityNet follows (default: the first "
        "--face photo's); --method infiniteyou: the photo whose face keypoints InfuseNet's control image draws "
        "(default: none, a black control image); the keypoint image used is saved as NAME_sSEED-kps.png",
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from ..outputs import contact_sheet
    from ..pipeline import ControlInput
    from ..results import free_path, save_images

    settings = settings_from_args(args)  # bad settings fail here, before anything loads
    controls, nets = _mode_arguments(args)
    _check_recorded_files(args, controls)
    _, region_files = regions_flags(args)
    regions, style_images, people = _people_and_references(args, settings, region_files)
    if settings.prompt is None:
        raise FaceIDError("give --prompt (or --settings FILE with a prompt)")
    if not isinstance(settings.prompt, str):
        raise FaceIDError("faceid generate takes one prompt; use the Python API for several")
    if args.best_of < 1:
        raise FaceIDError("--best-of must be at least 1")
    if args.preview_every is not None and args.preview_every < 1:
        raise FaceIDError("--preview-every must be at least 1")
    settings = tiny_vae_defaults(settings)
    method_weights(args, settings.method)  # --method-weights as the method needs, before anything loads
    if args.kps is not None and settings.method not in ("instantid", "infiniteyou"):
        raise FaceIDError(
            "--kps is the keypoint photo of --method instantid or infiniteyou: leave it out, or give one of those"
        )
    # The faces first: a photo without a usable face fails in seconds, before the big models load.
    analyzer = load_face_analyzer(args.face_models, settings.method)
    faces = [analyzer.get(photo, index=settings.face_index) for photo in args.face]
    pipe = load_pipeline(args, settings, analyzer, fuse_lora=args.fuse_lora)
    references = _load_references(pipe, args, settings, style_images)
    loaded = {source: pipe.load_controlnet(source) for source in dict.fromkeys(nets)}
    # Made at the generation size (lines and edges stay crisp), unless an init image sets the size.
    size = None
    if controls and not args.init_image:
        resolved = pipe.resolve_settings(settings.replace(seed=None))
        size = (resolved.width, resolved.height)
    control = [
        ControlInput(given.make(analyzer, size), loaded[net], given.scale)
        for given, net in zip(controls, nets, strict=True)
    ]
    modes = {"init_image": args.init_image, "mask_image": args.mask_image, "control": control or None}
    if args.kps is not None:
        # InfiniteYou finds the face on the photo fitted to the output frame, as its authors do.
        modes["kps"] = args.kps if settings.method == "infiniteyou" else analyzer.get(args.kps)
    recorded = _recorded_inputs(args, controls, nets, region_files)
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
        from ..evaluation import best_of_person
        from ..scoring import ClipTextScorer, IdentityScorer

        clip = ClipTextScorer(args.best_of_clip) if args.best_of_clip else None  # after the pipeline: already quiet
        kept = best_of_person(images, faces, IdentityScorer(analyzer), clip, run.prompt, keep=n)
        images, seeds = [images[s.index] for s in kept], [seeds[s.index] for s in kept]
        scores = [score.metadata(rank) for rank, score in enumerate(kept)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Image i with what reproduces it alone (`faceid generate --settings IMAGE.png --face ...`), and its scores.
    written = save_images(
        images,
        run.replace(seed=seeds),
        [free_path(out / f"{stem}_s{seed}.png") for seed in seeds],
        inputs={**recorded, "best_of": args.best_of if args.best_of > 1 else None},
        per_image=scores,
    )
    for path in written:
        for k, used in enumerate(result.control_images):  # what the ControlNet saw, at the output's size
            used.save(path.with_name(f"{path.stem}-control{k}.png"))
        if result.kps_image is not None:  # what IdentityNet saw
            result.kps_image.save(path.with_name(f"{path.stem}-kps.png"))
    labels = [
        f"seed {s}" + (f"  id {sc['identity_similarity']:.2f}" if sc else "")
        for s, sc in zip(seeds, scores, strict=True)
    ]
    sheet = contact_sheet(images, reference=faces[0].aligned, labels=labels)
    sheet_path = free_path(out / f"contact_sheet_s{first_seed}.png")
    sheet.save(sheet_path)
    for path in written:
        print(path)
    print(f"contact sheet: {sheet_path}")
    return 0


def _recorded_inputs(args: argparse.Namespace, controls: list, nets: list[str], region_files) -> dict:
    """What the images record of the files they were made from, by name and sha256 (never a path): the face
    photos, the init and mask images, the control images and ControlNets, and what the regions and references
    were read from (the settings hold what they became)."""
    from ..results import file_record, source_record

    def files(paths) -> list | None:
        return [file_record(path) for path in paths] if paths else None

    return {
        "face": files(args.face),
        **{key: file_record(value) for key in ("init_image", "mask_image", "kps") if (value := getattr(args, key))},
        "controls": [given.record(net) for given, net in zip(controls, nets, strict=True)] or None,
        "regions_photo": file_record(region_files) if isinstance(region_files, str) else None,
        "region_masks": files(args.region_mask),
        "style_images": files(reference_images(args)),
        # A kind (plain, plus, plus-face) as given, a file by its record (the settings name it by its stem).
        "style_adapter": None if args.style_adapter is None else source_record(args.style_adapter),
        "combo": args.combo,
    }


def _control_argument(text: str):
    """``KIND:IMAGE[:SCALE]`` -> its ``ControlFile``; the image path may hold colons."""
    from ..control_files import ControlFile

    kind, sep, rest = text.partition(":")
    if not sep or kind not in CONTROL_KINDS or not rest:
        raise FaceIDError(f"--control {text!r}: give KIND:IMAGE[:SCALE] with KIND one of {', '.join(CONTROL_KINDS)}")
    image, scale = path_and_number(rest)
    return ControlFile(kind, image, 1.0 if scale is None else scale)


def _mode_arguments(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The ``--control`` items (``ControlFile``\\ s) and the ControlNet of each, checked before anything loads."""
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
    return controls, nets * len(controls) if len(nets) == 1 else nets


def _check_recorded_files(args: argparse.Namespace, controls: list) -> None:
    """``--settings IMAGE.png``: the files the image was made from that its metadata names without their path
    must be given again, like ``--face``: the models that were local files or folders, the init and mask
    images, the control images. A file other than the one recorded (by its sha256) is a warning: the image
    will differ (the face photos may be anyone's: the settings are reused for another person too)."""
    if not (getattr(args, "settings", None) and Path(args.settings).suffix.lower() == ".png"):
        return
    from ..outputs import read_settings
    from ..results import MODEL_FILES, file_record, is_local, matches
    from ..settings import GenerationSettings

    stored = read_settings(args.settings)

    def flag(key: str) -> str:
        return GenerationSettings.model_fields[key].json_schema_extra["cli"]["flags"][-1]

    def differs(given, what: str) -> None:
        logger.warning("%s is not the %s %s was made with: the image will differ", given, what, args.settings)

    for key, record in (stored.get(MODEL_FILES) or {}).items():
        if key == "loras":
            wanted = ", ".join(f"{r['name']}:{r['weight']:g}" for r in record)
            if not args.loras:
                raise FaceIDError(
                    f"{args.settings} was made with the local LoRA file(s) {wanted}, which images name without "
                    f"their path: give {flag(key)} FILE:WEIGHT again for each"
                )
            given = sorted((file_record(p, remember=True).get("sha256"), w) for p, w in args.loras if is_local(p))
            if given != sorted((r["sha256"], r["weight"]) for r in record):
                differ = ", ".join(f"{p}:{w:g}" for p, w in args.loras)
                differs(differ, f"{flag(key)} files and weights ({wanted})")
            continue
        kind = "file" if "sha256" in record else "folder"
        if getattr(args, key) is None:
            raise FaceIDError(
                f"{args.settings} was made with the local {key} {kind} {record['name']}, which images name without "
                f"its path: give {flag(key)} again (the same {kind})"
            )
        if not matches(record, getattr(args, key), remember=True):
            differs(getattr(args, key), f"{flag(key)} {kind} ({record['name']})")
    style_adapter = stored.get("style_adapter")  # a file's record (the settings ask for it again: _style_records)
    if isinstance(style_adapter, dict) and args.style_adapter and not matches(style_adapter, args.style_adapter):
        differs(args.style_adapter, f"--style-adapter file ({style_adapter['name']})")
    for key, flag_name in (("init_image", "--init-image"), ("mask_image", "--mask-image")):
        record = _recorded_file(stored, key)
        given = getattr(args, key)
        if record is not None and given is None:
            raise FaceIDError(
                f"{args.settings} was made from {flag_name} {record['name']}: give {flag_name} (the same file)"
            )
        if record is not None and not matches(record, given):
            differs(given, f"{flag_name} file ({record['name']})")
    recorded_controls = stored.get("controls") or []
    if recorded_controls and not controls:
        kinds = ", ".join(c["kind"] for c in recorded_controls)
        raise FaceIDError(f"{args.settings} was made with ControlNets ({kinds}): give --controlnet and --control")
    for before, given in zip(recorded_controls, controls, strict=False):
        if isinstance(before.get("image"), dict) and not matches(before["image"], given.image):
            differs(given.image, f"--control image ({before['image']['name']})")


def _recorded_file(stored: dict, key: str) -> dict | None:
    """The record of the input file ``key`` in a PNG's metadata; an image written before records named files
    without their path held the path, and its sha256 under ``KEY_sha256``."""
    value = stored.get(key)
    if isinstance(value, str):
        return {"name": Path(value).name, "sha256": stored.get(f"{key}_sha256")}
    return value


def _people_and_references(args: argparse.Namespace, settings, regions) -> tuple[object, list, bool]:
    """``generate``'s ``regions=`` input (``regions``: the photo or masks of ``regions_flags``) and reference
    images, loaded and checked before the models load; and whether the ``--face`` photos are the people of one
    picture (else: photos of one person)."""
    from ..images import load_image

    people = settings.regions is not None or regions is not None
    if people:
        if args.best_of > 1:
            raise FaceIDError("--best-of scores the likeness of one person: leave it out with --regions/--region-mask")
        if combo_of(args) is not None:
            raise FaceIDError("--combo reads one person's photo: leave out --regions/--region-mask")
        given = regions if isinstance(regions, list) else settings.regions
        if isinstance(given, list) and len(given) != len(args.face):
            raise FaceIDError(f"{len(given)} regions for {len(args.face)} --face photos: give one region per person")
    if settings.regions == "masks" and regions is None:
        raise FaceIDError("these settings place the people by mask images: give one --region-mask per --face again")
    images = reference_images(args)
    if settings.style and not images:
        raise FaceIDError(
            f"these settings name {len(settings.style)} style reference(s): give their images again with --style "
            "IMAGE[:SCALE] (and --combo NAME where it was used)"
        )
    loaded = [load_image(m) for m in regions] if isinstance(regions, list) else regions and load_image(regions)
    return loaded, [load_image(image) for image in images], people


def _load_references(pipe, args: argparse.Namespace, settings, images: list) -> list:
    """The reference adapter of ``--style-adapter`` loaded, and each reference image with its ``style`` record."""
    from ..groups import Reference
    from ..references import reference_name

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
    combo = combo_of(args) is not None
    return [
        Reference(image, record.scale, name, record.window, record.region, combo and k == len(images) - 1)
        for k, (image, record) in enumerate(zip(images, settings.style, strict=True))
    ]


def _preview_saver(folder: Path, stem: str, seeds: list[int]):
    """``on_preview`` for ``faceid generate``: each image's preview as ``STEM_sSEED-stepNNN.png`` in ``folder``."""
    from ..atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)

    def save(step: int, total: int, images: list) -> None:
        digits = max(3, len(str(total)))
        for image, seed in zip(images, seeds, strict=True):
            with atomic_path(folder / f"{stem}_s{seed}-step{step:0{digits}d}.png") as tmp:
                image.save(tmp, format="PNG")

    return save
