"""Best-of-K: of several candidates, keep those most like the person (``faceid generate --best-of K``), and
what a kept image records of its scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..images import ImageSource
from ..scoring import ClipTextScorer, IdentityScore, IdentityScoring

__all__ = ["BestOfScore", "best_of", "best_of_person"]


@dataclass(frozen=True)
class BestOfScore:
    """Why a candidate was kept: its position in the input, its identity score and its CLIP-T."""

    index: int
    similarity: float
    no_face: bool
    recognizer: str
    clip_t: float | None = None

    def metadata(self, rank: int) -> dict[str, Any]:
        """What the kept image records of its scores, ``rank`` its place among the kept (0: the best)."""
        return {
            "identity_similarity": round(self.similarity, 6),
            "identity_recognizer": self.recognizer,
            "no_face": self.no_face,
            "clip_t": None if self.clip_t is None else round(self.clip_t, 6),
            "best_of_rank": rank,
        }


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


def best_of_person(
    candidates: Sequence[ImageSource],
    faces: Sequence[Any],
    identity_scorer: IdentityScoring,
    clip_scorer: ClipTextScorer | None = None,
    prompt: str | None = None,
    keep: int = 1,
) -> list[BestOfScore]:
    """``best_of`` for the person of ``faces`` (the ``Face`` of each photo of them: the mean of their
    embeddings is the reference): the scores of the ``keep`` candidates kept, best first (``index``: which)."""
    reference = np.mean([face.embedding for face in faces], axis=0)
    reference = reference / np.linalg.norm(reference)
    return [score for _, score in best_of(candidates, reference, identity_scorer, clip_scorer, prompt, keep=keep)]
