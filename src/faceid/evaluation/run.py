"""Running an evaluation: generate, keep and score images, write the results.

* :func:`run_eval` generates the grid identities x prompts x seeds x adapter scales with a
  :class:`~faceid.pipeline.FaceIDPipeline` (groups of identities pictured together are cases of the grid
  too, each person scored on the face the best assignment gives them), keeps every image (a PNG that remembers its settings), skips
  images that are already there with the same settings (so an interrupted run resumes), scores them and
  writes ``results.jsonl``, ``summary.json``, ``summary.md`` and plots.
* :func:`score_folder` scores images that already exist (``faceid score``).

With ``run_eval(..., ray=RayEval(...))`` the pipeline calls and the scoring run on Ray Data actors that load the
models themselves (:mod:`faceid.ray_data`); the calls, the rows and the files are the same.

Layout of an evaluation folder (``--out DIR``)::

    DIR/images/scale_<s>/<identity>/p<NN>_s<seed>.png   every generated image, settings in its text chunks
    DIR/results.jsonl                                   one row per image (see docs/EVALUATION.md)
    DIR/summary.json, DIR/summary.md                    per scale, per prompt and per identity statistics
    DIR/plots/curve.png, prompts.png, histograms.png    identity vs CLIP-T over the scale; per prompt; histograms

Comparing methods (``run_eval(..., methods=["faceid", "instantid"])``): each method's grid in ``DIR/<method>/``
(the layout above, without plots), and in ``DIR`` the comparison: ``summary.json``/``summary.md`` (one row per
method), ``results.jsonl`` (every row with its ``method``), ``plots/<method>.png`` and ``plots/methods.png``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..atomic import atomic_write
from ..errors import FaceIDError, ImageError
from ..images import ImageSource, load_image
from ..outputs import read_settings, save_png
from ..results import file_record, shareable_settings
from ..scoring import ClipTextScorer, IdentityScoring, diversity
from ..settings import GenerationSettings
from .inputs import EvalGroup, list_identities, list_images, load_prompts, parse_scales, parse_seeds, resolve_groups
from .methods import (
    compare_methods,
    methods_markdown,
    parse_methods,
    resolve_methods,
    scorer_recognizer,
    settings_for_method,
    training_scorers,
)
from .plots import write_method_plots, write_plots
from .summary import summarize, summary_markdown

if TYPE_CHECKING:  # pragma: no cover
    from ..ray_data import RayWorkers

__all__ = ["EvalResult", "RayEval", "named_references", "run_eval", "score_folder", "write_jsonl"]

logger = logging.getLogger(__name__)

# Settings that describe the file itself rather than how it was made: not compared when resuming.
_NOT_COMPARED = {"faceid_version", "licences", "commercial_use"}


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
    # A comparison of methods (run_eval(..., methods=...)): each method's own result, by its name in the list.
    methods: dict[str, EvalResult] = field(default_factory=dict)


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
    settings: GenerationSettings | Mapping[str, Any] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    batch_size: int = 4,
    extra_metadata: Mapping[str, Any] | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
    groups: Sequence[EvalGroup | str | Sequence[str]] = (),
    methods: Sequence[str] | str | None = None,
    ray: RayEval | None = None,
) -> EvalResult:
    """Generate, keep and score the grid identities x prompts x seeds x scales; write results and summary.

    ``faces_dir``: one photo per identity (the file stem names it); each photo is both the identity the
    adapter is conditioned on and the reference the scores compare with. ``prompts``: a list, or a file
    (default: the shipped list). ``seeds``: a count K (seeds 0..K-1) or a list. ``scales``: adapter
    scales (the identity strength), for the identity-vs-prompt-fidelity curve. ``identity_scorers``:
    recognizers, the first being the primary one (ArcFace buffalo_l, then SFace); ``clip_scorer``:
    CLIP-T and diversity (None skips both). ``resume``: keep images already in ``out_dir`` whose stored
    settings match; an image there with *other* settings is an error unless ``overwrite``. ``resume=False``
    regenerates everything. ``settings``: the generation settings every image shares
    (``GenerationSettings``: steps, guidance, size, negative prompt, window...; the grid sets prompt, seed
    and scale itself); each PNG stores its own, so any image of the grid reproduces alone.
    ``extra_metadata``: more values stored in every PNG and compared when resuming (the CLI passes the
    VAE it loaded). ``log``: progress messages.

    ``groups``: pictures of several people, each a case of the grid beside the single identities:
    :class:`~faceid.evaluation.EvalGroup` (or ``"obama,biden"``), naming identities of ``faces_dir``.
    They are generated with the group's ``regions`` and every person is scored on the face the best
    assignment gives them (:meth:`~faceid.scoring.IdentityScorer.score_people`); the row's ``similarity``
    is the mean over the people, ``similarity_min`` the least-like person, ``people`` each one's scores.

    ``methods``: compare identity methods on the same grid (``["faceid", "instantid"]`` or ``"faceid,instantid"``;
    how FaceID variants are named: :mod:`faceid.evaluation.methods`), all loaded on ``pipe``. Each method's grid
    goes to ``out_dir/<method>/`` (its images, ``results.jsonl``, ``summary.json``/``.md``, resumable on its own);
    ``out_dir`` gets the comparison: ``summary.json``/``summary.md`` (one row per method: identity similarity per
    recognizer, which recognizer the method was trained with, CLIP-T, seconds per image, count),
    ``results.jsonl`` (every row, with its ``method``), and ``plots/<method>.png`` (each method's identity vs
    CLIP-T over the scales) and ``plots/methods.png`` (a point per method). ``result.methods`` holds each
    method's own :class:`EvalResult`. Every method is checked (known, wired, loaded) before the first image. A
    method's training recognizer that no scorer embeds with is added as a scorer when its pack is at hand
    (``glintr100`` from the pipeline's analyzer for InstantID, :func:`~faceid.evaluation.methods.training_scorers`),
    else the comparison says it is missing (``missing_recognizers``).

    ``ray`` (a :class:`RayEval`): the images are made and scored by Ray Data actors instead of in this process:
    the grid's pipeline calls (the same calls, the same seeds, so the same images) on actors that each load the
    pipeline with ``ray.pipeline()``, then every image's scores on actors that each load the scorers with
    ``ray.scorers()``; ``pipe`` and the scorers given here still check the inputs and plan the grid, and the
    files written are the same as without Ray (every worker must see ``faces_dir`` and ``out_dir`` at the same
    paths).
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
    photos = dict(identities)
    # The cases of the grid: each identity alone (no regions), then each group with its regions.
    cases: list[tuple[str, tuple[str, ...], Any]] = [(name, (name,), None) for name, _ in identities]
    cases += [(g.name, g.people, g.regions) for g in resolve_groups(groups, list(photos))]
    out_dir = Path(out_dir).expanduser()
    scorers = list(identity_scorers)
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise FaceIDError(f"two identity scorers share a name: {names}")

    # Everything that can fail on the inputs fails here, before the first image is generated.
    shared = GenerationSettings.parse(settings)
    grid_axes = {"prompt", "seed", "scale", "num_images_per_prompt", "regions"} | ({"method"} if methods else set())
    axes = sorted(shared.model_fields_set & grid_axes)
    if axes:
        raise FaceIDError(
            f"the evaluation grid sets {', '.join(axes)} itself: use its prompts, seeds and scales (and groups"
            + (", and its methods)" if methods else ")")
        )
    entries = resolve_methods(pipe, parse_methods(methods)) if methods is not None else None
    missing: dict[str, str] = {}
    if entries:  # each method is also read on the recognizer it was trained with, when its pack is at hand
        added, missing = training_scorers(entries, scorers, pipe.face_analyzer)
        scorers += added
        names += [scorer.name for scorer in added]
        if len(set(names)) != len(names):
            raise FaceIDError(f"two identity scorers share a name: {names}")
        for name, why in missing.items():
            say(f"not scored by {name}, the recognizer a compared method was trained with: {why}")
    if entries and groups and any(e.method != "faceid" for e in entries):
        others = ", ".join(e.name for e in entries if e.method != "faceid")
        raise FaceIDError(f"groups (several people in one picture) are FaceID's: {others} picture one person")
    # The settings of each grid: one, or one per method (its own defaults and the shared values it takes).
    runs = [(None, out_dir, pipe.resolve_settings(shared))]
    if entries is not None:
        runs = [(e, out_dir / e.name, pipe.resolve_settings(settings_for_method(shared, e))) for e in entries]
    faces = {name: pipe.face_analyzer.get(photo, index=shared.face_index) for name, photo in identities}
    for scorer in scorers:  # a reference photo in which a recognizer finds no face fails here
        if hasattr(scorer, "reference_embedding"):
            for _, photo in identities:
                scorer.reference_embedding(photo)

    extra = dict(extra_metadata or {})
    records = {name: file_record(photo) for name, photo in identities}  # by name and sha256, never a path
    grid = _Grid(prompts, seeds, scales, cases, photos, records, faces, extra)
    # Every grid's plan before any image: a folder of another run fails here, not halfway.
    plans = [_plan(grid, folder, run_settings, resume, overwrite) for _, folder, run_settings in runs]

    # Every grid's images first (all methods' pipeline calls together: on Ray, one pool of actors loads the
    # pipeline once for all of them), then every image's scores.
    batches = [batch for run, plan in enumerate(plans) for batch in _batches(plan, batch_size, run)]
    timings = _generate(pipe, grid, runs, plans, batches, say, ray)
    all_jobs = [job for plan in plans for job in plan.jobs]
    say(
        f"scoring {len(all_jobs)} image(s) with {', '.join(names) or 'no recognizer'}"
        + (f" and CLIP ({clip_scorer.name})" if clip_scorer is not None else "")
    )
    if ray is None:
        measures = _measure((scorers, clip_scorer), all_jobs)
    else:
        measures = _measure_on_ray(all_jobs, ray, names)

    results = []
    start = 0
    for run, ((entry, folder, run_settings), plan) in enumerate(zip(runs, plans, strict=True)):
        rows = _rows(plan.jobs, measures[start : start + len(plan.jobs)], folder)
        start += len(plan.jobs)
        run_info = {
            **run_settings.to_json(),
            **extra,
            "identities": [name for name, _ in identities],
            **({"groups": [name for name, _, regions in cases if regions is not None]} if groups else {}),
            "prompts": prompts,
            "seeds": seeds,
            "scales": scales,
            "recognizers": names,
            "clip_model": clip_scorer.name if clip_scorer is not None else None,
            "faceid_version": __version__,
        }
        summary = summarize(rows, recognizers=names, settings=run_info)
        summary["timing"] = timings[run].summary(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "results.jsonl", rows)
        atomic_write(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write(folder / "summary.md", summary_markdown(summary))
        # A comparison draws its own plots (one per method and one of all); a single run, its curve and the rest.
        plot_paths = write_plots(summary, rows, folder / "plots", say) if plots and entry is None else []
        results.append(EvalResult(rows, summary, folder, timings[run].generated, plan.reused, plot_paths))
        say(f"results: {folder / 'results.jsonl'}; summary: {folder / 'summary.md'}")
    if entries is None:
        return results[0]

    # ---- the comparison of the methods ---------------------------------------------------------
    by_method = {entry.name: result for entry, result in zip(entries, results, strict=True)}
    comparison = compare_methods(
        entries,
        {name: result.summary for name, result in by_method.items()},
        {scorer.name: scorer_recognizer(scorer) for scorer in scorers},
        {
            **{k: v for k, v in results[0].summary["settings"].items() if k not in _PER_METHOD},
            "methods": [entry.name for entry in entries],
        },
        missing,
    )
    rows = [
        {"method": name, **row, "path": _relative(result.out_dir / row["path"], out_dir)}
        for name, result in by_method.items()
        for row in result.rows
    ]
    write_jsonl(out_dir / "results.jsonl", rows)
    atomic_write(out_dir / "summary.json", json.dumps(comparison, indent=2) + "\n")
    atomic_write(out_dir / "summary.md", methods_markdown(comparison))
    plot_paths = write_method_plots(comparison, out_dir / "plots", say) if plots else []
    say(f"methods compared: {out_dir / 'summary.md'}")
    return EvalResult(
        rows,
        comparison,
        out_dir,
        sum(r.generated for r in results),
        sum(r.reused for r in results),
        plot_paths,
        methods=by_method,
    )


# Settings a comparison's methods do not share (each method's folder has its own).
_PER_METHOD = {"method", "scale", "identitynet_scale", "combine", "shortcut", "s_scale", "lora_scale", "adapter"}


@dataclass
class _Grid:
    """What every grid of a run shares: prompts, seeds, scales, the cases, their photos and faces."""

    prompts: list[str]
    seeds: list[int]
    scales: list[float]
    cases: list[tuple[str, tuple[str, ...], Any]]
    photos: dict[str, Path]
    records: dict[str, Any]
    faces: dict[str, Any]
    extra: dict[str, Any]


@dataclass
class _Plan:
    """One grid in one folder: every image (``jobs``), those to generate (``todo``), how many are there."""

    settings: GenerationSettings
    jobs: list[dict[str, Any]]
    todo: list[tuple[tuple[str, tuple[str, ...], Any], int, float, list[dict[str, Any]]]]
    reused: int


def _plan(grid: _Grid, out_dir: Path, shared: GenerationSettings, resume: bool, overwrite: bool) -> _Plan:
    """Which images of the grid are already in ``out_dir`` (an image there made with other settings is an error
    unless ``overwrite``), and which to generate."""
    from ..methods import identity_method

    jobs: list[dict[str, Any]] = []
    todo: list[tuple[tuple[str, tuple[str, ...], Any], int, float, list[dict[str, Any]]]] = []
    reused = 0
    terms = identity_method(shared.method).licence_record()  # what every image records of its method's terms
    for scale in grid.scales:
        for case in grid.cases:
            name, people, regions = case
            # Who is pictured: one identity as always, a group's people in their order; and their photos.
            who: dict[str, Any] = {"identity": name, **({} if regions is None else {"people": list(people)})}
            who["face"] = [grid.records[p] for p in people]
            placement = {} if regions is None else {"regions": regions}
            for p_index, prompt in enumerate(grid.prompts):
                missing = []
                for seed in grid.seeds:
                    path = out_dir / "images" / f"scale_{_fmt_scale(scale)}" / name / f"p{p_index:02d}_s{seed}.png"
                    # What reproduces this image alone, and where it belongs in the grid.
                    metadata = {
                        **shareable_settings(shared.replace(prompt=prompt, seed=seed, scale=scale, **placement)),
                        **who,
                        "prompt_index": p_index,
                        **grid.extra,
                        **terms,
                        "faceid_version": __version__,
                    }
                    job = {"identity": name, "people": people, "group": regions is not None}
                    job.update({"photos": [grid.photos[p] for p in people], "prompt": prompt, "prompt_index": p_index})
                    job.update({"seed": seed, "scale": scale, "path": path, "metadata": metadata})
                    jobs.append(job)
                    if resume and path.exists() and _same_settings(path, metadata, overwrite):
                        reused += 1
                    else:
                        missing.append(job)
                if missing:
                    todo.append((case, p_index, scale, missing))
    return _Plan(shared, jobs, todo, reused)


@dataclass
class _Batch:
    """One pipeline call of a grid: up to ``batch_size`` seeds of one case, prompt and scale (``run``: which
    grid, one per method)."""

    run: int
    case: tuple[str, tuple[str, ...], Any]
    prompt_index: int
    scale: float
    jobs: list[dict[str, Any]]
    request: GenerationSettings


def _batches(plan: _Plan, batch_size: int, run: int) -> list[_Batch]:
    """The pipeline calls that make what the plan is missing."""
    step = max(1, int(batch_size))
    batches = []
    for (name, people, regions), p_index, scale, missing in plan.todo:
        placement = {} if regions is None else {"regions": regions}
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            request = plan.settings.replace(
                prompt=chunk[0]["prompt"],
                num_images_per_prompt=len(chunk),
                seed=[j["seed"] for j in chunk],
                scale=scale,
                **placement,
            )
            batches.append(_Batch(run, (name, people, regions), p_index, scale, chunk, request))
    return batches


def _make_images(pipe, faces: Mapping[str, Any], batch: _Batch) -> float:
    """One pipeline call and its PNGs; the seconds the call took. The same here and on a Ray actor."""
    name, people, regions = batch.case
    # A group: all its people in every image, person k in region k.
    face = faces[name] if regions is None else [faces[p] for p in people]
    began = time.perf_counter()
    result = pipe(face=face, settings=batch.request)
    seconds = time.perf_counter() - began
    for job, image in zip(batch.jobs, result.images, strict=True):
        job["path"].parent.mkdir(parents=True, exist_ok=True)
        save_png(image, job["path"], job["metadata"])
    return seconds


@dataclass
class _Generator:
    """A process's pipeline (here, or a Ray actor's) and the runs it has made a call of: a run's first call in a
    process pays what is done once (kernels chosen, a method's pipeline built, caches filled), so it is timed apart."""

    pipe: Any
    warmed: set[int] = field(default_factory=set)

    def make(self, faces: Mapping[str, Any], batch: _Batch) -> tuple[float, bool]:
        """(seconds, whether it was the run's first call here)."""
        first = batch.run not in self.warmed
        self.warmed.add(batch.run)
        return _make_images(self.pipe, faces, batch), first


@dataclass
class _Timing:
    """A run's generation time: every call, and the calls after each process's first one of the run."""

    generated: int = 0
    seconds: float = 0.0
    timed_images: int = 0
    timed_seconds: float = 0.0
    warm_up_calls: int = 0

    def add(self, images: int, seconds: float, first: bool) -> None:
        self.generated += images
        self.seconds += seconds
        if first:
            self.warm_up_calls += 1
        else:
            self.timed_images += images
            self.timed_seconds += seconds

    def summary(self, folder: Path) -> dict[str, Any]:
        """Seconds per image, over the calls after the warm-up ones (over all of them when there were no others);
        when it generated none (all resumed), the last run's figure from the folder's summary.json."""
        if self.generated:
            warm = self.timed_images > 0
            per_image = self.timed_seconds / self.timed_images if warm else self.seconds / self.generated
            return {
                "images": self.generated,
                "seconds": self.seconds,
                "seconds_per_image": per_image,
                "timed_images": self.timed_images if warm else self.generated,
                "warm_up_calls": self.warm_up_calls,
                "warm_up_seconds": self.seconds - self.timed_seconds,
                "warm_up_left_out": warm,
            }
        try:
            previous = json.loads((folder / "summary.json").read_text())["timing"]
            return {**previous, "from_earlier_run": True}
        except (OSError, ValueError, KeyError, TypeError):
            return {"images": 0, "seconds": 0.0, "seconds_per_image": None}


def _generate(pipe, grid: _Grid, runs, plans: list[_Plan], batches: list[_Batch], say, ray: RayEval | None):
    """Make every batch's images (here, or on Ray actors, in the order they finish); each run's ``_Timing``."""
    timings = [_Timing() for _ in plans]
    generated = [0] * len(plans)
    if ray is None:
        here = _Generator(pipe)
        done = ((index, here.make(grid.faces, batch)) for index, batch in enumerate(batches))
    else:
        from ..ray_data import map_on_actors

        setup = functools.partial(_load_generator, ray.pipeline)
        work = functools.partial(_make_images_of, grid.faces)
        done = map_on_actors(batches, setup, work, ray.workers, batch_size=(1, 1))
    for entry, folder, _ in runs:
        if entry is not None:
            say(f"method {entry.name} ({entry.title}) into {folder}")
    for index, (took, first) in done:
        batch = batches[index]
        entry = runs[batch.run][0]
        timings[batch.run].add(len(batch.jobs), took, first)
        generated[batch.run] += len(batch.jobs)
        plan = plans[batch.run]
        say(
            f"[{generated[batch.run]}/{len(plan.jobs) - plan.reused}] "
            + (f"{entry.name}: " if entry is not None else "")
            + f"{batch.case[0]} p{batch.prompt_index:02d} scale {batch.scale:g}: {len(batch.jobs)} image(s)"
        )
    for (_, folder, _), plan, count in zip(runs, plans, generated, strict=True):
        say(f"{count} image(s) generated, {plan.reused} reused from {folder}")
    return timings


@dataclass(frozen=True)
class RayEval:
    """How ``run_eval`` runs on Ray Data: where and on how many actors (``workers``), and what each actor loads,
    as picklable callables of paths (``functools.partial`` of a module-level loader): ``pipeline()`` -> the
    pipeline (with every compared method loaded, as the ``pipe`` given to ``run_eval``), ``scorers()`` ->
    ``(identity scorers, CLIP scorer or None)``, the same recognizers under the same names as the run's
    (including the training recognizers a comparison adds). The pipeline object itself is never pickled."""

    workers: RayWorkers
    pipeline: Callable[[], Any]
    scorers: Callable[[], tuple[Sequence[IdentityScoring], ClipTextScorer | None]]


def _load(loader: Callable[[], Any]) -> Any:
    """A Ray actor's state: what its loader loads, once."""
    return loader()


def _load_generator(loader: Callable[[], Any]) -> _Generator:
    """A generation actor's state: its pipeline, loaded once, and the runs it has warmed up."""
    return _Generator(loader())


def _make_images_of(faces: Mapping[str, Any], generator: _Generator, batches: list[_Batch]) -> list[tuple]:
    """A generation actor's work: its batches' pipeline calls, each (seconds, first call of its run here)."""
    return [generator.make(faces, batch) for batch in batches]


def _measure_on_ray(jobs: list[dict[str, Any]], ray: RayEval, names: list[str]) -> list[dict[str, Any]]:
    """:func:`_measure` of every job on scoring actors, put back in job order; the actors' recognizers must be
    the run's."""
    from ..ray_data import map_on_actors

    measures: list[dict[str, Any] | None] = [None] * len(jobs)
    for index, measure in map_on_actors(jobs, functools.partial(_load, ray.scorers), _measure, ray.workers):
        if list(measure["similarity"]) != names:
            raise FaceIDError(
                f"the Ray actors' scorers are {list(measure['similarity'])}, the run's {names}: RayEval.scorers "
                "must load the same recognizers, in the same order"
            )
        measures[index] = measure
    return measures  # type: ignore[return-value]


def _fmt_scale(scale: float) -> str:
    return f"{scale:g}"


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


def _measure(state: tuple[Sequence[IdentityScoring], ClipTextScorer | None], jobs) -> list[dict[str, Any]]:
    """Each job's image measured: identity scores (one person, or each of a group), and with a CLIP scorer its
    image embedding and CLIP-T. The same here (every job at once) and on a Ray actor (a batch)."""
    scorers, clip_scorer = state
    measures = []
    for job in jobs:
        if not job["group"]:
            measures.append({**_scores(scorers, job["path"], job["photos"][0]), "people": None})
            continue
        person_scores, extra_faces = _people_scores(scorers, job["path"], job["photos"])
        # The picture as a whole: the mean over its people (one not found counts 0, as a faceless image
        # does alone), the least-like person, and "no face" when anyone is missing.
        measures.append(
            {
                "similarity": {n: float(np.mean([p["similarity"][n] for p in person_scores])) for n in extra_faces},
                "similarity_min": {n: min(p["similarity"][n] for p in person_scores) for n in extra_faces},
                "no_face": {n: any(p["no_face"][n] for p in person_scores) for n in extra_faces},
                "extra_faces": extra_faces,
                "people": person_scores,
            }
        )
    if clip_scorer is not None and jobs:
        image_emb = clip_scorer.image_embeddings([job["path"] for job in jobs])
        prompts = sorted({job["prompt"] for job in jobs})
        text_emb = clip_scorer.text_embeddings(prompts)
        index = {p: i for i, p in enumerate(prompts)}
        clip_t = np.einsum("nd,nd->n", image_emb, text_emb[[index[job["prompt"]] for job in jobs]])
        for measure, embedding, value in zip(measures, image_emb, clip_t, strict=True):
            measure["image_embedding"] = np.asarray(embedding)
            measure["clip_t"] = float(value)
    return measures


def _rows(jobs, measures: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``: each job with its measures, and the diversity of its seeds."""
    rows = []
    for job, measure in zip(jobs, measures, strict=True):
        scores = {k: v for k, v in measure.items() if k not in ("people", "image_embedding", "clip_t")}
        if not job["group"]:
            faces, people = job["photos"][0].name, {}
        else:
            faces = [photo.name for photo in job["photos"]]
            people = {
                "people": [
                    {"identity": person, "face": photo.name, **person_score}
                    for person, photo, person_score in zip(job["people"], job["photos"], measure["people"], strict=True)
                ]
            }
        rows.append(
            {
                "identity": job["identity"],
                "face": faces,
                **people,
                "prompt": job["prompt"],
                "prompt_index": job["prompt_index"],
                "seed": job["seed"],
                "scale": job["scale"],
                **scores,
                "clip_t": measure.get("clip_t"),
                "path": _relative(job["path"], out_dir),
            }
        )
    if rows and all("image_embedding" in m for m in measures):
        image_emb = np.stack([m["image_embedding"] for m in measures])
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row["scale"], row["identity"], row["prompt_index"]), []).append(i)
        for members in groups.values():
            value = diversity(image_emb[members])
            for i in members:
                rows[i]["diversity"] = value  # of the group (identity, prompt, scale) the image belongs to
    return rows


def _scores(scorers: Sequence[IdentityScoring], image: ImageSource, reference: Any) -> dict[str, dict[str, Any]]:
    """One person: ``similarity`` and ``no_face`` per recognizer, for the largest face of ``image``."""
    results = {scorer.name: scorer.score(image, reference) for scorer in scorers}
    return {
        "similarity": {name: r.similarity for name, r in results.items()},
        "no_face": {name: r.no_face for name, r in results.items()},
    }


def _people_scores(
    scorers: Sequence[IdentityScoring], image: ImageSource, references: Sequence[Any]
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, int]]:
    """Several people: for each, ``similarity``, ``no_face`` and the matched face's ``box`` per recognizer
    (each recognizer makes its own assignment); and per recognizer the faces matched to nobody."""
    people: list[dict[str, dict[str, Any]]] = [{"similarity": {}, "no_face": {}, "box": {}} for _ in references]
    extra_faces = {}
    for scorer in scorers:
        result = scorer.score_people(image, references)
        extra_faces[scorer.name] = result.extra_faces
        for person, score in zip(people, result.people, strict=True):
            person["similarity"][scorer.name] = score.similarity
            person["no_face"][scorer.name] = score.no_face
            person["box"][scorer.name] = None if score.box is None else [round(v, 1) for v in score.box]
    return people, extra_faces


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, written atomically (``results.jsonl``, ``faceid score --out``)."""
    return atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


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


def named_references(reference_face: Any) -> list[tuple[str | None, Any]]:
    """``(name, reference)`` per person: one reference (name None), a list (named by file stems) or a
    mapping ``{name: reference}``; a list of one is one person."""
    if isinstance(reference_face, Mapping):
        people = [(str(name), ref) for name, ref in reference_face.items()]
    elif isinstance(reference_face, (list, tuple)):
        people = [
            (Path(ref).stem if isinstance(ref, (str, os.PathLike)) else f"person {k}", ref)
            for k, ref in enumerate(reference_face)
        ]
    else:
        return [(None, reference_face)]
    if not people:
        raise FaceIDError("no reference face: give a photo of each person the images should show")
    names = [name for name, _ in people]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated and len(people) > 1:
        raise FaceIDError(
            f"two reference photos are both named {repeated[0]!r}: give the people photos with different file "
            "names (the name labels each person's scores)"
        )
    return people


def score_folder(
    images_dir: str | os.PathLike,
    reference_face: ImageSource | Sequence[ImageSource] | Mapping[str, ImageSource],
    scorers: Sequence[IdentityScoring],
    clip_scorer: ClipTextScorer | None = None,
    prompt: str | None = None,
    recursive: bool = True,
) -> list[dict[str, Any]]:
    """Score every image in ``images_dir`` against ``reference_face``: one row per image (and person).

    Row: ``path`` (relative to ``images_dir``), ``prompt``, ``similarity`` and ``no_face`` per recognizer,
    ``clip_t`` (None without a CLIP scorer or a prompt). The prompt for CLIP-T is ``prompt`` when given,
    else the one stored in the image (PNGs written by faceid remember theirs).

    Several people (a list of photos, named by their file stems, or a mapping ``{name: photo}``): every
    image is a picture of all of them, its faces matched to the people by the best assignment
    (:meth:`~faceid.scoring.IdentityScorer.score_people`); one row per image and person, with ``person``,
    the matched face's ``box`` per recognizer (None: not found, ``no_face``) and the image's
    ``extra_faces`` (faces matched to nobody) per recognizer.
    """
    folder = Path(images_dir).expanduser()
    images = list_images(folder, recursive)
    scorers = list(scorers)
    people = named_references(reference_face)
    references = [ref for _, ref in people]
    for scorer in scorers:  # a reference without a face fails before any image is scored
        if hasattr(scorer, "reference_embedding"):
            for reference in references:
                scorer.reference_embedding(reference)
    rows = []
    for path in images:
        try:
            load_image(path)
        except ImageError as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        image = {"path": _relative(path, folder), "prompt": prompt or _image_prompt(path)}
        if len(people) == 1:
            rows.append({**image, **_scores(scorers, path, references[0]), "clip_t": None})
            continue
        person_scores, extra_faces = _people_scores(scorers, path, references)
        for (name, _), person_score in zip(people, person_scores, strict=True):
            rows.append({**image, "person": name, **person_score, "extra_faces": extra_faces, "clip_t": None})
    if clip_scorer is not None:
        # One CLIP-T per image (its rows for several people share it).
        with_prompt = list({r["path"]: r for r in rows if r["prompt"]}.values())
        if with_prompt:
            values = clip_scorer.score([folder / r["path"] for r in with_prompt], [r["prompt"] for r in with_prompt])
            clip_t = {r["path"]: float(value) for r, value in zip(with_prompt, values, strict=True)}
            for row in rows:
                row["clip_t"] = clip_t.get(row["path"])
    return rows
