"""The summary of an evaluation: statistics of its ``results.jsonl`` rows per scale, prompt and identity,
and per person of the group pictures (``summary.json``), and the same as Markdown tables (``summary.md``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["format_rate", "format_stats", "group_stats", "summarize", "summary_markdown"]


def _mean_std(values: Iterable[float | None]) -> dict[str, float | int | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def group_stats(rows: Sequence[Mapping[str, Any]], recognizers: Sequence[str], weakest: bool = False) -> dict[str, Any]:
    """``n``, identity similarity per recognizer, CLIP-T and diversity of ``rows``. ``weakest``: also the
    mean over the images of their least-like person (``similarity_min`` of a group picture; a one-person
    image's own similarity)."""
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
        if weakest:
            identity[rec]["weakest"] = _mean_std(r.get("similarity_min", r["similarity"])[rec] for r in rows)["mean"]
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

    With group pictures (rows with ``people``), an image's similarity is the mean over its people; every
    group also has ``identity.<recognizer>.weakest`` (the mean of the least-like person of each image),
    and ``by_person`` has the statistics of each person of each group, per scale.
    """
    if recognizers is None:
        recognizers = list(rows[0]["similarity"]) if rows else []
    weakest = any("people" in r for r in rows)

    def stats(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return group_stats(members, recognizers, weakest)

    scales = sorted({r["scale"] for r in rows})
    out: dict[str, Any] = {"settings": dict(settings or {}), "overall": stats(rows)}
    out["by_scale"] = [{"scale": s, **stats([r for r in rows if r["scale"] == s])} for s in scales]
    by_prompt, by_identity, by_person = [], [], []
    for s in scales:
        at = [r for r in rows if r["scale"] == s]
        for p_index in sorted({r["prompt_index"] for r in at}):
            members = [r for r in at if r["prompt_index"] == p_index]
            by_prompt.append(
                {
                    "scale": s,
                    "prompt_index": p_index,
                    "prompt": members[0]["prompt"],
                    **stats(members),
                }
            )
        for name in sorted({r["identity"] for r in at}):
            members = [r for r in at if r["identity"] == name]
            # The identity's name as "name": "identity" is the recognizers' statistics, as in every group.
            by_identity.append({"scale": s, "name": name, **stats(members)})
            if "people" in members[0]:
                for k, person in enumerate(members[0]["people"]):
                    # The person's own scores (their "no_face": not found), without CLIP-T and diversity,
                    # which belong to the picture.
                    person_stats = group_stats([r["people"][k] for r in members], recognizers)
                    entry = {"scale": s, "name": name, "person": person["identity"], "position": k}
                    by_person.append({**entry, "n": person_stats["n"], "identity": person_stats["identity"]})
    out["by_prompt"] = by_prompt
    out["by_identity"] = by_identity
    if weakest:
        out["by_person"] = by_person
    return out


def format_stats(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats.get("mean") is None:
        return "-"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def format_rate(value: float | None) -> str:
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
            f"{settings.get('num_inference_steps')} / {settings.get('guidance_scale')}"
            if settings.get("num_inference_steps")
            else None,
        ),
        ("size", f"{settings.get('width')}x{settings.get('height')}" if settings.get("width") else None),
        ("recognizers", ", ".join(recs) or None),
        ("CLIP (CLIP-T, diversity)", settings.get("clip_model")),
        ("images", summary["overall"]["n"]),
        ("seconds per image", _seconds_per_image(summary.get("timing"))),
    ]
    lines += [f"- {key}: {value}" for key, value in described if value is not None]
    lines += [
        "",
        "Identity similarity: cosine between the reference photo's face and the largest face of each image "
        "(an image without a face counts as 0; *detected* = over images with a face). CLIP-T: raw cosine of "
        "CLIP image and prompt embeddings (x100 for CLIPScore-style tables). Diversity: mean pairwise "
        "1 - cos of CLIP image embeddings across the seeds of one identity and prompt. Values: mean ± std.",
    ]
    weakest = "by_person" in summary
    if weakest:
        lines += [
            "",
            "Group pictures: each person is scored on the face the best assignment of faces to people gives "
            "them (a person without a face counts as 0); the picture's similarity is the mean over its people, "
            "*weakest* the mean of its least-like person, and its faces are *found* when every person's is.",
        ]
    lines += ["", "## Per adapter scale", ""]
    head = ["scale", "images"]
    for rec in recs:
        head += [f"{rec} similarity", f"{rec} (detected)"]
        head += [f"{rec} weakest person"] if weakest else []
        head += [f"{rec} faces found"]
    head += ["CLIP-T", "diversity"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in summary["by_scale"]:
        cells = [f"{group['scale']:g}", str(group["n"])]
        for rec in recs:
            ident = group["identity"][rec]
            cells += [format_stats(ident), format_stats({"mean": ident["mean_detected"]})]
            cells += [format_stats({"mean": ident["weakest"]})] if weakest else []
            cells += [format_rate(ident["detection_rate"])]
        cells += [format_stats(group["clip_t"], 4), format_stats(group["diversity"])]
        lines.append("| " + " | ".join(cells) + " |")

    for title, key, label in (("Per prompt", "by_prompt", "prompt"), ("Per identity", "by_identity", "identity")):
        lines += ["", f"## {title}", ""]
        for scale in sorted({g["scale"] for g in summary[key]}):
            lines += [f"### scale {scale:g}", ""]
            head = [label] + [f"{rec} similarity" for rec in recs] + [f"{rec} faces" for rec in recs]
            head += ["CLIP-T", "diversity"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for group in (g for g in summary[key] if g["scale"] == scale):
                name = group["prompt"] if key == "by_prompt" else group["name"]
                cells = [str(name).replace("|", "\\|")]
                cells += [format_stats(group["identity"][rec]) for rec in recs]
                cells += [format_rate(group["identity"][rec]["detection_rate"]) for rec in recs]
                cells += [format_stats(group["clip_t"], 4), format_stats(group["diversity"])]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")

    if weakest:
        lines += ["", "## Per person in group pictures", ""]
        for scale in sorted({g["scale"] for g in summary["by_person"]}):
            lines += [f"### scale {scale:g}", ""]
            head = ["group", "person"] + [f"{rec} similarity" for rec in recs] + [f"{rec} found" for rec in recs]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for entry in (g for g in summary["by_person"] if g["scale"] == scale):
                cells = [str(entry["name"]).replace("|", "\\|"), str(entry["person"]).replace("|", "\\|")]
                cells += [format_stats(entry["identity"][rec]) for rec in recs]
                cells += [format_rate(entry["identity"][rec]["detection_rate"]) for rec in recs]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _seconds_per_image(timing: Mapping[str, Any] | None) -> str | None:
    """``timing`` (what run_eval measured) in words: seconds per generated image, over how many."""
    if not timing or timing.get("seconds_per_image") is None:
        return None
    earlier = ", an earlier run's" if timing.get("from_earlier_run") else ""
    over = timing.get("timed_images", timing["images"])
    if timing.get("warm_up_left_out"):
        warm = timing["warm_up_calls"]
        earlier = f", the first call{'s' if warm > 1 else ''} of the run left out as warm-up" + earlier
    elif timing.get("warm_up_calls"):
        earlier = ", its first call's warm-up included: one call only" + earlier
    return f"{timing['seconds_per_image']:.3g} (over {over} generated image(s){earlier})"
