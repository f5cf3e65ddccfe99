"""``faceid eval``: generate identities x prompts x seeds (x scales), score likeness and prompt fidelity, report."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from ..errors import FaceIDError
from .flags import (
    add_ray_argument,
    add_settings_arguments,
    int_at_least,
    ray_session,
    ray_workers,
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
from .score import add_scorer_arguments, build_scorers

EVAL_GRID_FIELDS = ("prompt", "seed", "scale", "num_images_per_prompt")
# --method is the evaluation's own: a list of methods to compare (one grid each), not one call's method.
EVAL_OWN_FIELDS = ("method",)


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
    add_settings_arguments(parser, exclude=EVAL_GRID_FIELDS + EVAL_OWN_FIELDS)
    methods = parser.add_argument_group("comparing identity methods (--method A,B)")
    methods.add_argument(
        "--method",
        dest="methods",
        default=None,
        metavar="A,B,...",
        help="compare these identity methods on the same grid, comma-separated: faceid (the --adapter loaded), a "
        "FaceID variant by name (faceid-plusv2, or a released name such as faceid-plusv2-sdxl: one per run), "
        "instantid (with --method-weights instantid=FOLDER); each into OUT/METHOD/, the comparison in OUT",
    )
    add_method_weights_argument(methods)
    # --face-models comes with the scorer flags, which `faceid score` shares.
    add_model_loading_arguments(parser, single_file=False, face_models=False)
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    add_scorer_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="regenerate every image, even those already there")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace images in --out that were made with other settings"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not draw the plots")
    add_ray_argument(parser, "the pipeline calls and the scoring")
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        default=2,
        help="--ray: actors that each load the pipeline (then as many that each load the scorers) (2)",
    )
    parser.add_argument("--out", required=True, help="folder for images, results.jsonl, summary and plots")


def cmd_eval(args: argparse.Namespace) -> int:
    """``faceid eval``: everything is checked (photos, faces, prompts, models) before the first image."""
    from ..evaluation import (
        list_identities,
        load_prompts,
        parse_scales,
        parse_seeds,
        resolve_groups,
        run_eval,
    )
    from ..evaluation.summary import format_rate, format_stats

    prompts = load_prompts(args.prompts)
    seeds = parse_seeds(args.seeds)
    scales = parse_scales(args.scales)
    identities = list_identities(args.faces)
    groups = resolve_groups(args.group, [name for name, _ in identities])
    if args.batch_size < 1:
        raise FaceIDError("--batch-size must be at least 1")
    settings = tiny_vae_defaults(settings_from_args(args))
    entries = _check_methods(args, settings)  # before anything loads
    if entries:
        from ..variants import VARIANTS

        # A released FaceID variant named in the list is the adapter to load when --adapter is left out.
        variant = next((e.name for e in entries if e.method == "faceid" and e.name in VARIANTS), None)
        if variant is not None and settings.adapter is None:
            settings = settings.replace(adapter=variant)
    analyzer = _eval_analyzer(args, entries)
    for _, photo in identities:
        analyzer.get(photo)  # NoFaceError names the photo
    scorers, clip, analyzer = build_scorers(args, analyzer)
    pipe = load_pipeline(args, settings, analyzer, fuse_when_compiled=False, progress=False)
    ray = None
    if args.ray is not None:  # the actors load what this process loaded, from the same command line
        from ..evaluation import RayEval

        ray = RayEval(
            ray_workers(args, args.workers),
            pipeline=functools.partial(load_eval_pipeline, args, settings, entries),
            scorers=functools.partial(load_eval_scorers, args, entries),
        )
    cases = len(identities) + len(groups)
    n = cases * len(prompts) * len(seeds) * len(scales) * max(1, len(entries))
    print(
        f"evaluating {len(identities)} identities"
        + (f" + {len(groups)} group(s)" if groups else "")
        + f" x {len(prompts)} prompts x {len(seeds)} seeds x {len(scales)} scales"
        + (f" x {len(entries)} methods ({', '.join(e.name for e in entries)})" if entries else "")
        + f" = {n} images into {args.out}"
    )
    with ray_session(ray.workers if ray is not None else None):  # one Ray instance for both pipelines
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
            methods=[e.name for e in entries] or None,
            ray=ray,
        )
    print()
    if entries:
        print(_methods_table(result.summary))
        print("* the recognizer the method is conditioned on (it can flatter the method): compare on the others")
        from ..evaluation.methods import missing_recognizer_lines

        for line in missing_recognizer_lines(result.summary):
            print(line[2:])
        print(f"\nwrote {Path(args.out) / 'summary.md'}, summary.json, results.jsonl, plots/ and a folder per method")
        return 0
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


def _eval_analyzer(args: argparse.Namespace, entries: list):
    """buffalo_l's analyzer, with the recognizer of every compared method's pack (antelopev2 for InstantID)."""
    from ..methods import identity_method

    analyzer = load_face_analyzer(args.face_models)
    for pack in dict.fromkeys(identity_method(e.method).face_pack for e in entries):
        if pack != "buffalo_l":  # the recognizer another method embeds faces with (antelopev2 for InstantID)
            analyzer = analyzer.with_pack(pack, args.face_models or None)
    return analyzer


def _on_actor(args: argparse.Namespace) -> argparse.Namespace:
    """The command line as an actor reads it: ``--device`` and ``--clip-device`` are this process's; an actor uses
    the GPU Ray gave it, else its CPU (the best device it has)."""
    return argparse.Namespace(**{**vars(args), "device": None, "clip_device": None})


def load_eval_pipeline(args: argparse.Namespace, settings, entries: list):
    """What an ``eval --ray`` generation actor loads: the pipeline ``faceid eval`` loads, from the command line."""
    args = _on_actor(args)
    analyzer = _eval_analyzer(args, entries)
    return load_pipeline(args, settings, analyzer, fuse_when_compiled=False, progress=False)


def load_eval_scorers(args: argparse.Namespace, entries: list):
    """What an ``eval --ray`` scoring actor loads: the recognizers (with the training recognizers a comparison
    adds, as ``run_eval`` adds them) and the CLIP scorer of the command line."""
    from ..evaluation.methods import training_scorers

    args = _on_actor(args)
    scorers, clip, analyzer = build_scorers(args, _eval_analyzer(args, entries))
    added, _ = training_scorers(entries, scorers, analyzer)
    return [*scorers, *added], clip


def _check_methods(args: argparse.Namespace, settings) -> list:
    """``--method A,B``'s entries, checked before anything loads: known and wired methods, one FaceID variant at
    most, each other method with its ``--method-weights`` and its face pack at hand. [] without --method."""
    from ..evaluation.methods import check_method_names
    from ..faces.model_files import face_pack_ready
    from ..methods import identity_method
    from ..variants import VARIANTS, released

    if args.methods is None:
        if getattr(args, "method_weights", None):
            raise FaceIDError("--method-weights goes with --method (the methods to compare): give --method A,B")
        return []
    entries = check_method_names(args.methods)
    for entry in entries:
        method_weights(args, entry.method)  # --method instantid needs --method-weights instantid=FOLDER
        pack = identity_method(entry.method).face_pack
        if pack != "buffalo_l":
            face_pack_ready(pack, args.face_models or None, what=f"method {entry.method}")
    variants = [e.name for e in entries if e.method == "faceid" and e.name in VARIANTS]
    if variants and settings.adapter is not None and settings.adapter != variants[0]:
        release = released(settings.adapter)
        if release is not None and release.name != variants[0]:
            raise FaceIDError(
                f"--method names {variants[0]} but --adapter is {settings.adapter}: leave --adapter out, or name "
                "the adapter's variant (or faceid) in --method"
            )
    return entries


def _methods_table(comparison) -> str:
    """The comparison's table as ``summary.md`` has it (one row per method)."""
    from ..evaluation import methods_markdown

    text = methods_markdown(comparison)
    table = text[text.index("| method") : text.index("\n## Per scale")]
    return table.rstrip()
