"""``faceid prepare``: a folder of captioned photos turned into a training dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .flags import add_ray_argument, int_at_least, ray_session, ray_workers
from .loading import FACE_MODELS_HELP


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``faceid prepare`` options to ``parser`` (a sub-command parser); returns it."""
    from ..data import MULTI_FACE_POLICIES

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
        type=int_at_least(0),
        default=64,
        help="skip faces narrower than this many pixels (default 64)",
    )
    parser.add_argument(
        "--with-crops", action="store_true", help="also store the 224x224 aligned face crops (needed for Plus)"
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=2,
        help="parallel face analyzers (threads; --ray: actors) (default 2)",
    )
    parser.add_argument(
        "--shard-size", type=int_at_least(1), default=256, help="source images per shard file (default 256)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild the output folder even if it was prepared with other settings"
    )
    add_ray_argument(parser, "the face analysis")
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    """``faceid prepare``: prints the summary; exit status 2 when no image was kept."""
    import functools

    from ..data import prepare_dataset
    from ..data.shards import SKIPPED_FILE
    from ..faces import FaceAnalyzer

    ray = ray_workers(args, args.workers)
    with ray_session(ray):
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
            ray=ray,
        )
    print(report.summary())
    if report.kept == 0:
        print(
            f"faceid: error: no image was kept; see {Path(report.out_dir) / SKIPPED_FILE} for the reasons.",
            file=sys.stderr,
        )
        return 2
    return 0
