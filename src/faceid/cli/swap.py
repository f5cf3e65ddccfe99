"""``faceid swap``: the person of face photos put into another photo, in place of a face there (inpainting)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ..errors import FaceIDError
from .embed import print_faces
from .flags import add_settings_arguments, settings_from_args, tiny_vae_defaults
from .loading import add_model_loading_arguments, load_face_analyzer, load_pipeline


def add_swap_arguments(parser: argparse.ArgumentParser) -> None:
    """``faceid swap``: the person, the target photo and its face, the mask and crop; the generation settings
    (but the image size: the crop's) and model flags of ``generate``."""
    from ..swap import DEFAULT_FEATHER, DEFAULT_MARGIN

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
    from ..outputs import save_png
    from ..results import file_record, free_path, image_metadata
    from ..settings import FAMILY_DEFAULTS
    from ..swap import DEFAULT_SWAP_PROMPT, load_target, pipeline_inpaint, plan_swap, swap_face

    settings = settings_from_args(args)
    if settings.prompt is None:
        settings = settings.replace(prompt=DEFAULT_SWAP_PROMPT)
    if not isinstance(settings.prompt, str):
        raise FaceIDError("faceid swap takes one prompt")
    settings = tiny_vae_defaults(settings)
    # Every bad input fails here, in seconds, before the big models load: the person's photos, the target and
    # its face, the mask, the crop's numbers.
    analyzer = load_face_analyzer(args.face_models)
    faces = [analyzer.get(photo, index=settings.face_index) for photo in args.face]
    target = load_target(args.target, analyzer=analyzer, face_index=args.target_face_index, mask=args.mask)
    print_faces(target.faces, args.target_face_index)
    geometry = {"margin": args.margin, "feather": args.feather}
    plan_swap(target.image, target.face, resolution=args.resolution or 512, **geometry)
    pipe = load_pipeline(args, settings, analyzer)
    resolution = args.resolution or min(FAMILY_DEFAULTS[pipe.family][key] for key in ("width", "height"))
    first_seed = settings.seed if settings.seed is not None else random.randrange(2**31)
    batch = settings.replace(seed=[first_seed + i for i in range(settings.num_images_per_prompt)])
    out = Path(args.out)
    stem = Path(args.target).stem
    # What every image records of its inputs, by name and sha256 (never a path), and of the swap's geometry.
    inputs = {
        "face": [file_record(photo) for photo in args.face],
        "target": file_record(args.target),
        "target_face_index": args.target_face_index,
        "mask": None if args.mask is None else file_record(args.mask),
        "resolution": resolution,
        **geometry,
    }
    written = []
    for i, seed in enumerate(batch.seed):
        result = swap_face(target, pipeline_inpaint(pipe, batch.for_image(i), faces), resolution=resolution, **geometry)
        metadata = image_metadata(batch, i, {**inputs, "crop_box": list(result.plan.box)})
        out.mkdir(parents=True, exist_ok=True)
        written.append(save_png(result.image, free_path(out / f"{stem}_swap_s{seed}.png"), metadata))
    mask_path = free_path(out / f"{stem}_swap_mask.png")
    result.mask.save(mask_path)
    for path in written:
        print(path)
    print(f"mask (white = repainted): {mask_path}")
    return 0
