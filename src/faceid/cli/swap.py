"""``faceid swap``: the person of face photos put into another photo, in place of a face there (inpainting)."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .. import __version__
from ..errors import FaceIDError
from .embed import print_faces
from .flags import add_settings_arguments, settings_from_args, tiny_vae_defaults
from .generate import free_path
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
        written.append(save_png(result.image, free_path(out / f"{stem}_swap_s{seed}.png"), metadata))
    mask_path = free_path(out / f"{stem}_swap_mask.png")
    result.mask.save(mask_path)
    for path in written:
        print(path)
    print(f"mask (white = repainted): {mask_path}")
    return 0
