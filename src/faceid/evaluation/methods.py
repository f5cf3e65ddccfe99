"""Comparing identity methods in one evaluation: which methods a run names, the settings each gets, which
recognizer each was trained with, and the comparison table of ``faceid eval --method A,B``.

How a method list names things (``run_eval(..., methods=[...])``, ``faceid eval --method A,B``):

* ``faceid``: IP-Adapter-FaceID with the pipeline's own adapter (``--adapter``), whatever variant it is.
* ``faceid-<variant>``: the same, naming the variant, e.g. ``faceid-plusv2`` (the architecture's label,
  ``faceid.variants.ARCHITECTURES``) or ``faceid-plusv2-sdxl`` (a released name, ``faceid.variants.VARIANTS``).
  It must be the variant the pipeline has loaded: a pipeline holds one FaceID adapter, so a run compares at most
  one FaceID variant (two are refused before anything is generated; run ``faceid eval`` once per variant, same
  grid, into its own ``--out``). On the command line a released name also loads that adapter when ``--adapter``
  is left out.
* any other wired method of ``faceid.methods.METHODS`` (``instantid``), loaded on the pipeline beside FaceID
  (``FaceIDPipeline.load_method`` / ``from_pretrained(..., methods=...)``; ``--method-weights NAME=FOLDER``).

Each method's images, results and summary go to ``OUT/<name>/`` (an evaluation folder as a single run writes
it), so a method added later to the list reuses what the others made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FaceIDError, MissingWeightsError
from ..methods import METHODS, identity_method, refuse_unwired
from ..settings import GenerationSettings
from ..variants import ARCHITECTURES, VARIANTS, released
from .summary import format_stats

__all__ = [
    "EvalMethod",
    "compare_methods",
    "methods_markdown",
    "parse_methods",
    "resolve_methods",
    "scorer_recognizer",
    "settings_for_method",
    "training_recognizer",
    "training_scorers",
]

# Settings of FaceID's adapter alone: another method refuses them (faceid.plan.check_method_settings), so a shared
# value (a flag of the run) goes to the FaceID entry only. identitynet_scale, InstantID's, likewise to InstantID;
# PuLID's num_zero and ortho to PuLID.
FACEID_ONLY = ("combine", "shortcut", "s_scale", "lora_scale", "identity_guidance")
METHOD_ONLY = {"identitynet_scale": "instantid", "pulid_num_zero": "pulid", "pulid_ortho": "pulid"}


@dataclass(frozen=True)
class EvalMethod:
    """One entry of a run's method list: ``name`` as the list gives it (its folder and its row), ``method`` the
    identity method it runs (``GenerationSettings.method``)."""

    name: str
    method: str

    @property
    def title(self) -> str:
        return METHODS[self.method].title

    @property
    def trained_with(self) -> str:
        """The recognizer whose embedding the method is conditioned on (the table's words)."""
        return METHODS[self.method].recognizer


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"faceid,instantid"`` -> ["faceid", "instantid"]; no entry twice."""
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    names = [n for n in names if n]
    if not names:
        raise FaceIDError(f"--method takes identity methods, comma-separated (faceid,instantid), got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FaceIDError(f"--method names {repeated[0]} twice")
    return names


def _faceid_variant(name: str) -> bool:
    return name == "faceid" or name.startswith("faceid-")


def _known_variant(name: str) -> bool:
    return name == "faceid" or name in VARIANTS or name in {a.label for a in ARCHITECTURES.values()}


def check_method_names(names: Sequence[str]) -> list[EvalMethod]:
    """The entries, checked against faceid's tables alone (no pipeline needed): known, wired, at most one FaceID
    variant. What the pipeline has loaded is :func:`resolve_methods`'s."""
    entries = []
    for name in parse_methods(names):
        if _faceid_variant(name):
            if not _known_variant(name):
                labels = sorted({a.label for a in ARCHITECTURES.values()} | set(VARIANTS))
                raise FaceIDError(
                    f"unknown FaceID variant {name!r} in the method list: faceid (the loaded --adapter), or one of "
                    f"{', '.join(labels)}"
                )
            entries.append(EvalMethod(name, "faceid"))
            continue
        method = identity_method(name)  # unknown: the list of methods
        refuse_unwired(method)
        entries.append(EvalMethod(name, name))
    variants = [e.name for e in entries if e.method == "faceid"]
    if len(variants) > 1:
        raise FaceIDError(
            f"the method list names {len(variants)} FaceID variants ({', '.join(variants)}): a pipeline holds one "
            "FaceID adapter, so one run compares one of them with the other methods. Run `faceid eval` once per "
            "variant (--adapter VARIANT) with the same faces, prompts, seeds and scales, each into its own --out"
        )
    return entries


def loaded_variant_names(pipe) -> set[str]:
    """The names that say the pipeline's FaceID adapter: faceid, its architecture's label, its released name; none
    for a model set without a FaceID adapter (FLUX.1)."""
    if getattr(pipe, "adapter", True) is None:
        return set()
    source = getattr(pipe, "adapter_source", None)
    release = released(source) if source is not None else None
    names = {"faceid"}
    if release is not None:
        names |= {release.name, release.architecture.label}
    else:
        names.add(pipe.adapter.spec.architecture(Path(str(source or "")).name).label)
    return names


def resolve_methods(pipe, names: Sequence[str]) -> list[EvalMethod]:
    """The entries of ``names`` that ``pipe`` can run, or a FaceIDError before anything is generated: an unknown or
    unwired method, a method not loaded on the pipeline, a FaceID variant other than the loaded adapter."""
    entries = check_method_names(names)
    for entry in entries:
        if entry.method == "faceid":
            have = loaded_variant_names(pipe)
            if not have:
                raise FaceIDError(
                    f"{entry.name} in the method list, but this {pipe.family} model set has no FaceID adapter: its "
                    f"methods are {', '.join(pipe.methods) or 'none'}; leave {entry.name} out"
                )
            if entry.name not in have:
                raise FaceIDError(
                    f"{entry.name} in the method list, but this pipeline's FaceID adapter is "
                    f"{pipe.adapter_source} ({', '.join(sorted(have - {'faceid'}))}): load that variant "
                    f"(--adapter {entry.name if entry.name in VARIANTS else 'VARIANT'}), or write faceid"
                )
        else:
            pipe.loaded_method(entry.method)  # loaded, or the error that says how to load it
    return entries


def settings_for_method(shared: GenerationSettings, entry: EvalMethod) -> GenerationSettings:
    """The run's shared settings as method ``entry`` takes them: its ``method``, without the values that belong to
    another method (FaceID's combine, shortcut, LoRA scale, identity guidance; InstantID's IdentityNet scale; PuLID's
    num_zero and ortho)."""
    drop = {k for k, owner in METHOD_ONLY.items() if owner != entry.method}
    if entry.method != "faceid":
        drop |= set(FACEID_ONLY)
    values = {k: getattr(shared, k) for k in shared.model_fields_set if k not in drop}
    return GenerationSettings.parse({**values, "method": entry.method})


def scorer_recognizer(scorer) -> str:
    """The recognizer model a scorer embeds faces with, as a file stem (``w600k_r50`` for the ``arcface`` scorer,
    ``glintr100``, ``sface``), else the scorer's name. An analyzer of an insightface pack answers with the pack's
    recognizer (a folder's recognizer of another file name, taken for the pack, stands in for it)."""
    from ..faces.model_files import FACE_PACKS

    analyzer = getattr(scorer, "analyzer", None)
    pack = getattr(analyzer, "pack", None)
    if pack in FACE_PACKS:
        return Path(FACE_PACKS[pack].recognizer).stem
    recognizer = getattr(analyzer, "recognizer", None)
    return str(getattr(recognizer, "name", None) or scorer.name)


def training_recognizer(method: str) -> str:
    """The recognizer model identity method ``method`` is conditioned on, as a file stem (``w600k_r50`` for FaceID,
    ``glintr100`` for InstantID and PuLID): the first word of its table row's ``recognizer``."""
    return Path(METHODS[method].recognizer.split()[0]).stem


def training_scorers(entries: Sequence[EvalMethod], scorers: Sequence[Any], analyzer: Any) -> tuple[list, dict]:
    """The scorers a comparison adds so that each method is also read on the recognizer it was trained with, and
    the training recognizers it cannot add: (new scorers, {recognizer: why not}).

    A method's training recognizer (:func:`training_recognizer`) that none of ``scorers`` embeds with gets its
    pack's scorer (:func:`faceid.scoring.pack_scorer`: ``glintr100`` for InstantID) when the pack is at hand: in
    ``analyzer`` (the pipeline's, which has antelopev2's recognizer once InstantID is loaded), else in faceid's or
    insightface's cache; nothing is downloaded. A recognizer no pack has, or a pack not at hand, is reported."""
    from ..faces.model_files import FACE_PACKS
    from ..scoring import PACK_SCORERS, pack_scorer

    have = {scorer_recognizer(scorer) for scorer in scorers}
    packs = {Path(p.recognizer).stem: p.name for p in FACE_PACKS.values()}
    added, missing = [], {}
    for entry in entries:
        trained = training_recognizer(entry.method)
        if trained in have or trained in missing:
            continue
        pack = packs.get(trained)
        if pack is None or pack not in PACK_SCORERS.values():
            missing[trained] = f"faceid has no scorer for {trained}"
            continue
        try:
            scorer = pack_scorer(pack, analyzer=analyzer, download=False)
        except MissingWeightsError as exc:
            missing[trained] = f"insightface's {pack} face models are not at hand ({str(exc).splitlines()[0]})"
            continue
        added.append(scorer)
        have.add(trained)
    return added, missing


def compare_methods(
    entries: Sequence[EvalMethod],
    summaries: Mapping[str, Mapping[str, Any]],
    recognizers: Mapping[str, str],
    settings: Mapping[str, Any],
    missing: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The comparison table (``summary.json`` of a run with methods): per method its overall statistics (identity
    similarity per recognizer, CLIP-T, diversity, ``n``), seconds per image, per scale, and which of the run's
    recognizers it was trained with (``trained_on``) and which it was not (``independent``).

    ``summaries``: each method's own summary (:func:`~faceid.evaluation.summarize`, with ``timing``);
    ``recognizers``: the run's scorer names -> their recognizer models (:func:`scorer_recognizer`); ``missing``:
    training recognizers the run could not score with -> why (:func:`training_scorers`), kept as
    ``missing_recognizers`` and said in the Markdown."""
    methods = []
    for entry in entries:
        own = summaries[entry.name]
        trained = training_recognizer(entry.method)
        trained_on = [name for name, model in recognizers.items() if model == trained]
        timing = own.get("timing", {})
        methods.append(
            {
                "method": entry.name,
                "identity_method": entry.method,
                "title": entry.title,
                "adapter": own["settings"].get("adapter") if entry.method == "faceid" else None,
                "trained_with": entry.trained_with,
                "training_recognizer": trained,
                "trained_on": trained_on,
                "independent": [name for name in recognizers if name not in trained_on],
                "folder": entry.name,
                **own["overall"],
                "seconds_per_image": timing.get("seconds_per_image"),
                "timing": timing,
                "by_scale": own["by_scale"],
            }
        )
    comparison = {"settings": dict(settings), "methods": methods}
    if missing:
        comparison["missing_recognizers"] = dict(missing)
    return comparison


def methods_markdown(comparison: Mapping[str, Any]) -> str:
    """The comparison as Markdown (``summary.md`` of a run with methods): one row per method."""
    settings = comparison.get("settings", {})
    recs = list(settings.get("recognizers") or [])
    lines = ["# faceid evaluation: methods compared", ""]
    described = [
        ("base model", settings.get("base_model")),
        ("methods", ", ".join(m["method"] for m in comparison["methods"])),
        ("identities", len(settings.get("identities", [])) or None),
        ("prompts", len(settings.get("prompts", [])) or None),
        ("seeds", ", ".join(str(s) for s in settings.get("seeds", [])) or None),
        ("scales", ", ".join(f"{s:g}" for s in settings.get("scales", [])) or None),
        ("recognizers", ", ".join(recs) or None),
        ("CLIP (CLIP-T)", settings.get("clip_model")),
    ]
    lines += [f"- {key}: {value}" for key, value in described if value is not None]
    lines += missing_recognizer_lines(comparison)
    lines += [
        "",
        "Identity similarity: cosine between the reference photo's face and the largest face of each image (no face "
        "counts 0), per recognizer; `*` marks the recognizer the method is conditioned on, which can flatter it: "
        "compare methods on the others. CLIP-T: raw cosine. Seconds per image: generation wall time over the images "
        "this run generated (the first batch includes warm-up). Values: mean ± std over all scales.",
        "",
    ]
    head = ["method", "trained with", "images"] + [f"{rec} similarity" for rec in recs] + ["CLIP-T", "s / image"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in comparison["methods"]:
        cells = [m["method"], m["trained_with"], str(m["n"])]
        for rec in recs:
            cells.append(format_stats(m["identity"][rec]) + (" *" if rec in m["trained_on"] else ""))
        cells += [format_stats(m["clip_t"], 4), _seconds(m["seconds_per_image"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Per scale", ""]
    head = ["method", "scale", "images"] + [f"{rec} similarity" for rec in recs] + ["CLIP-T"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in comparison["methods"]:
        for group in m["by_scale"]:
            cells = [m["method"], f"{group['scale']:g}", str(group["n"])]
            cells += [format_stats(group["identity"][rec]) for rec in recs]
            cells += [format_stats(group["clip_t"], 4)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each method's images, results and full summary: its folder (`<method>/summary.md`)."]
    return "\n".join(lines) + "\n"


def missing_recognizer_lines(comparison: Mapping[str, Any]) -> list[str]:
    """A line per method the run could not score with the recognizer it was trained with, saying why."""
    missing = comparison.get("missing_recognizers") or {}
    return [
        f"- not scored by its training recognizer: {m['method']} ({m['training_recognizer']}: "
        f"{missing[m['training_recognizer']]})"
        for m in comparison["methods"]
        if m.get("training_recognizer") in missing
    ]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
