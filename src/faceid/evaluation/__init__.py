"""Measure identity preservation and prompt fidelity: the protocol of the FaceID papers, on our own outputs.

Along the data flow: :mod:`~faceid.evaluation.inputs` (identities, prompts, seeds, scales),
:mod:`~faceid.evaluation.run` (generate, keep and score the grid: :func:`run_eval`; score existing
images: :func:`score_folder`), :mod:`~faceid.evaluation.summary` (statistics and Markdown tables),
:mod:`~faceid.evaluation.plots`; :mod:`~faceid.evaluation.methods` (several identity methods compared on one
grid: ``run_eval(..., methods=[...])``); and :mod:`~faceid.evaluation.best_of`, which keeps the candidates most
like the person. The scores themselves (identity similarity, CLIP-T, diversity) are :mod:`faceid.scoring`.
"""

from __future__ import annotations

from .best_of import BestOfScore, best_of, best_of_person
from .inputs import (
    DEFAULT_NUM_SEEDS,
    DEFAULT_SCALES,
    EvalGroup,
    default_prompts_path,
    list_identities,
    list_images,
    load_prompts,
    parse_group,
    parse_scales,
    parse_seeds,
    resolve_groups,
)
from .methods import EvalMethod, compare_methods, methods_markdown, parse_methods, resolve_methods
from .plots import write_method_plots, write_plots
from .run import EvalResult, RayEval, named_references, run_eval, score_folder, write_jsonl
from .summary import summarize, summary_markdown

__all__ = [
    "DEFAULT_NUM_SEEDS",
    "DEFAULT_SCALES",
    "BestOfScore",
    "EvalGroup",
    "EvalMethod",
    "EvalResult",
    "RayEval",
    "best_of",
    "best_of_person",
    "compare_methods",
    "default_prompts_path",
    "list_identities",
    "list_images",
    "load_prompts",
    "methods_markdown",
    "named_references",
    "parse_group",
    "parse_methods",
    "parse_scales",
    "parse_seeds",
    "resolve_groups",
    "resolve_methods",
    "run_eval",
    "score_folder",
    "summarize",
    "summary_markdown",
    "write_jsonl",
    "write_method_plots",
    "write_plots",
]
