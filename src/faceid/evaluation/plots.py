"""The plots of an evaluation: identity vs prompt fidelity over the adapter scale, per prompt, histograms, and
per person of the group pictures."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import save_figure

__all__ = ["write_method_plots", "write_plots"]

logger = logging.getLogger(__name__)


def write_plots(
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    folder: Path,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """``curve.png`` (identity similarity vs CLIP-T, one point per scale), ``prompts.png`` (per prompt),
    ``histograms.png`` (scores of every image), and with group pictures ``people.png`` (each person of each
    group). Needs matplotlib; without it, says so and writes none."""
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
    paths.append(_curve(folder / "curve.png", by_scale, recs, "over the adapter scale"))

    # 2. Per prompt: identity similarity (each recognizer) and CLIP-T, bars per scale.
    prompts = sorted({(g["prompt_index"], g["prompt"]) for g in summary["by_prompt"]})
    scales = [g["scale"] for g in by_scale]
    panels = recs + (["CLIP-T"] if has_clip else [])
    if prompts and panels:
        by_prompt = {(g["scale"], g["prompt_index"]): g for g in summary["by_prompt"]}

        def prompt_mean(panel: str, scale: float, p_index: int) -> float | None:
            group = by_prompt[(scale, p_index)]
            return (group["clip_t"] if panel == "CLIP-T" else group["identity"][panel])["mean"]

        labels = [(p_index, _short(p, 48)) for p_index, p in prompts]
        paths.append(_bars(folder / "prompts.png", labels, panels, scales, prompt_mean))

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

    # 4. Group pictures: each person's similarity (on the face assigned to them), bars per scale.
    if summary.get("by_person") and recs:
        by_person = {(g["scale"], g["name"], g["position"]): g for g in summary["by_person"]}
        people = sorted({(g["name"], g["position"], g["person"]) for g in summary["by_person"]})

        def person_mean(panel: str, scale: float, key: tuple[str, int]) -> float | None:
            entry = by_person.get((scale, *key))
            return None if entry is None else entry["identity"][panel]["mean"]

        labels = [((name, k), f"{_short(name, 32)}: {person}") for name, k, person in people]
        paths.append(_bars(folder / "people.png", labels, recs, scales, person_mean))
    return paths


def _curve(path: Path, by_scale: Sequence[Mapping[str, Any]], recs: Sequence[str], what: str) -> Path:
    """Identity similarity (one line per recognizer) against CLIP-T, one point per scale labelled with it; without
    CLIP-T, against the scale; without a recognizer, CLIP-T over the scale."""
    from matplotlib.figure import Figure

    has_clip = any(g["clip_t"]["mean"] is not None for g in by_scale)
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
    ax.set_title(f"identity vs prompt fidelity {what}" if has_clip else f"identity {what}")
    if not recs and has_clip:  # no recognizer: CLIP-T over the scale
        ax.plot([g["scale"] for g in by_scale], [g["clip_t"]["mean"] for g in by_scale], marker="o", label="CLIP-T")
        ax.set_xlabel("adapter scale")
        ax.set_ylabel("CLIP-T")
    ax.grid(alpha=0.3)
    ax.legend(title="recognizer" if recs else None)
    fig.tight_layout()
    return save_figure(fig, path)


def write_method_plots(
    comparison: Mapping[str, Any], folder: Path, log: Callable[[str], None] | None = None
) -> list[Path]:
    """A comparison of methods (``run_eval(..., methods=...)``): ``<method>.png`` per method (its identity vs
    CLIP-T over the scales, one line per recognizer) and ``methods.png`` (identity vs CLIP-T, a point per method
    and recognizer, over all scales; without CLIP-T, identity per method). Needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        (log or logger.warning)("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    methods = comparison["methods"]
    recs = list(comparison["settings"].get("recognizers") or [])
    if not methods or not (recs or any(m["clip_t"]["mean"] is not None for m in methods)):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_curve(folder / f"{m['method']}.png", m["by_scale"], recs, f"of {m['method']}") for m in methods]

    has_clip = any(m["clip_t"]["mean"] is not None for m in methods)
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    markers = "osD^v<>"
    for k, rec in enumerate(recs or ["CLIP-T"]):
        for position, m in enumerate(methods):
            x = m["clip_t"]["mean"] if has_clip else position
            y = m["clip_t"]["mean"] if not recs else m["identity"][rec]["mean"]
            if x is None or y is None:
                continue
            own = " (trained on)" if rec in m.get("trained_on", ()) else ""
            ax.scatter([x], [y], marker=markers[k % len(markers)], color=f"C{position}", s=60,
                       label=f"{m['method']}: {rec}{own}")  # fmt: skip
            ax.annotate(m["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("CLIP-T (prompt fidelity)" if has_clip else "method")
    if not has_clip:
        ax.set_xticks(range(len(methods)), [m["method"] for m in methods])
    ax.set_ylabel("identity similarity (cosine)" if recs else "CLIP-T")
    ax.set_title("methods: identity vs prompt fidelity (means over all scales)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, folder / "methods.png"))
    return paths


def _bars(
    path: Path,
    labels: Sequence[tuple[Any, str]],
    panels: Sequence[str],
    scales: Sequence[float],
    mean: Callable[[str, float, Any], float | None],
) -> Path:
    """Horizontal bars: one panel per recognizer (or CLIP-T), one row per ``(key, label)``, one bar per
    scale of height ``mean(panel, scale, key)`` (None: no bar)."""
    from matplotlib.figure import Figure

    height = max(3.0, 0.32 * len(labels) * max(1, len(scales)) / 2 + 1.5)
    fig = Figure(figsize=(5.0 * len(panels) + 2.5, height), dpi=100)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    positions = np.arange(len(labels))
    bar = 0.8 / max(1, len(scales))
    for ax, panel in zip(axes, panels, strict=True):
        for k, scale in enumerate(scales):
            values = [mean(panel, scale, key) for key, _ in labels]
            values = [np.nan if v is None else v for v in values]
            ax.barh(positions + k * bar - 0.4 + bar / 2, values, height=bar, label=f"scale {scale:g}")
        ax.set_title(panel if panel == "CLIP-T" else f"{panel} similarity")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [label for _, label in labels], fontsize=7)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
