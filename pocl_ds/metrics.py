"""Text metrics for instruction following: ROUGE-L F-measure and exact match.

ROUGE-L is the paper's metric (SPEC, Evaluation): Google's ``rouge-score`` with the Porter
stemmer on, F-measure, maximum over the acceptable references. Exact match is a stricter
companion reported beside it.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence

from rouge_score import rouge_scorer

from pocl_ds.errors import PoclError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # Building the scorer loads the stemmer; do it once per process.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_references(references: str | Sequence[str]) -> tuple[str, ...]:
    # A bare string is one reference, not a sequence of one-character references.
    refs = (references,) if isinstance(references, str) else tuple(references)
    if not refs:
        raise PoclError(
            "a sample has no reference answer to score against: give every evaluation "
            "sample a non-empty 'output' (a string or a list of strings)"
        )
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1] of ``prediction``, the maximum over ``references``.

    An empty (or whitespace-only) prediction scores 0.0. Multiply by 100 for the paper's scale.
    """
    refs = _as_references(references)
    if not prediction.strip():
        return 0.0
    scorer = _scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    refs = _as_references(references)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(ref) for ref in refs))
