"""``faceid eval``: generate identities x prompts x seeds (x scales), score likeness and prompt fidelity, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FaceIDError
from .flags import add_settings_arguments, settings_from_args, tiny_vae_defaults
from .loading import add_model_loading_arguments, load_face_analyzer, load_pipeline
from .score import add_scorer_arguments, build_scorers

EVAL_GRID_FIELDS = ("prompt", "seed", "scale", "num_images_per_prompt")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid eval``."""
    from ..evaluation import DEFAULT_NUM_SEEDS, DEFAULT_SCALES

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
    add_scorer_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="regenerate every image, even those already there")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace images in --out that were made with other settings"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    parser.add_argument("--out", required=True, help="folder for images, results.jsonl, summary and plots")


def cmd_eval(args: argparse.Namespace) -> int:
    """``faceid eval``: everything is checked (photos, faces, prompts, models) before the first image."""
    from ..evaluation import list_identities, load_prompts, parse_scales, parse_seeds, resolve_groups, run_eval
    from ..evaluation.summary import format_rate, format_stats

    prompts = load_prompts(args.prompts)
    seeds = parse_seeds(args.seeds)
    scales = parse_scales(args.scales)
    identities = list_identities(args.faces)
    groups = resolve_groups(args.group, [name for name, _ in identities])
    if args.batch_size < 1:
        raise FaceIDError("--batch-size must be at least 1")
    settings = tiny_vae_defaults(settings_from_args(args))
    analyzer = load_face_analyzer(args.face_models)
    for _, photo in identities:
        analyzer.get(photo)  # NoFaceError names the photo
    scorers, clip, analyzer = build_scorers(args, analyzer)
    pipe = load_pipeline(args, settings, analyzer, fuse_when_compiled=False, progress=False)
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
