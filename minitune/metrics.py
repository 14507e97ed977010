"""Task metrics of generated text against references, each value in [0, 1], as one flat dict.

    task_scores(predictions, references)   picks the kind of task (see :func:`detect_kind`) and scores it
    tag_scores(predictions, references)    tag lists ("books, power-of-words"): set precision, recall, F1
    text_scores(predictions, references)   free text: exact match and ROUGE-L F-measure

Tags are compared as sets of normalised tags (:func:`tag_set`). The headline numbers are macro
averages, the mean over examples of each example's precision / recall / F1, so that every example
weighs the same whatever its number of tags; the micro averages (totals pooled over examples, then one
precision / recall / F1) are reported too. One convention covers empty sets, in :func:`_prf`: an
empty set scores 1 against an empty set and 0 against a non-empty one, so an empty prediction (or an
empty reference) scores precision, recall and F1 0 unless both are empty.

ROUGE-L comes from the ``rouge-score`` package with its default tokenizer (lowercase, every run of
characters other than ASCII letters and digits is a separator: "Don't" and "Don’t" are both
``don t``; accented letters are separators too, and text in other scripts has no tokens and scores
0) and without stemming: the score counts the words the model wrote, not their stems ("cats" does not
match "cat"), and does not depend on an English-only stemmer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

__all__ = ["detect_kind", "tag_scores", "tag_set", "task_scores", "text_scores"]

KINDS = ("auto", "tags", "text")
# a comma-separated piece of more words than this, or with sentence punctuation, is not a tag; the
# shipped quotes data's longest tag has 6 words ("the-perks-of-being-a-wallflower") and no punctuation
MAX_TAG_WORDS = 8
_SENTENCE_PUNCTUATION = re.compile(r"[.!?;:\"“”]")
_SPACE_LIKE = re.compile(r"[-_\s]+")  # "power-of-words", "power_of_words" and "power  of words" are one tag


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: give one prediction "
                         "per reference")
    if not references:
        raise ValueError("no examples to score: give at least one prediction and reference")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def tag_set(text: str) -> frozenset[str]:
    """The tags of a comma-separated list, normalised to compare as a set.

    Each tag is case-folded, '-' and '_' count as spaces, runs of spaces become one and the ends
    are stripped: ``" Power-of_Words , books,, BOOKS"`` -> ``{"power of words", "books"}``.
    Empty tags are dropped and duplicates count once.

    Args:
        text: tags separated by commas (what a ``{tags}`` template renders).

    Returns:
        The set of normalised tags (empty for an empty text).
    """
    tags = (_SPACE_LIKE.sub(" ", tag.casefold()).strip() for tag in text.split(","))
    return frozenset(tag for tag in tags if tag)


def _prf(hits: int, predicted: int, relevant: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of `hits` correct out of `predicted` tags, `relevant` being right.

    The one place that decides empty sets: nothing predicted and nothing to find is a perfect
    score (1, 1, 1); otherwise an empty side makes its ratio 0 (and F1 0).
    """
    if predicted == 0 and relevant == 0:
        return 1.0, 1.0, 1.0
    precision = hits / predicted if predicted else 0.0
    recall = hits / relevant if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return precision, recall, f1


def tag_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Set precision, recall and F1 of the predicted tags against the reference tags.

    Both sides are parsed by :func:`tag_set`. Per example, precision is the share of predicted tags
    that are in the reference, recall the share of reference tags that were predicted, and F1 their
    harmonic mean. An empty prediction or an empty reference scores 0 on all three, unless both are
    empty (1 on all three); the micro averages follow the same rule on the summed counts.

    Args:
        predictions: generated texts, one per example.
        references: reference tag lists as text, one per example.

    Returns:
        ``examples`` (count); ``tag_precision``, ``tag_recall``, ``tag_f1``: means over examples of
        the per-example values (macro, the headline); ``tag_micro_precision``, ``tag_micro_recall``,
        ``tag_micro_f1``: from the tag counts summed over examples (micro).

    Raises:
        ValueError: no examples, or not as many predictions as references.
    """
    _check(predictions, references)
    per_example = []
    hits = predicted = relevant = 0
    for prediction, reference in zip(predictions, references, strict=True):
        got, want = tag_set(prediction), tag_set(reference)
        per_example.append(_prf(len(got & want), len(got), len(want)))
        hits, predicted, relevant = hits + len(got & want), predicted + len(got), relevant + len(want)
    precision, recall, f1 = (_mean(column) for column in zip(*per_example, strict=True))
    micro_precision, micro_recall, micro_f1 = _prf(hits, predicted, relevant)
    return {"examples": len(references), "tag_precision": precision, "tag_recall": recall, "tag_f1": f1,
            "tag_micro_precision": micro_precision, "tag_micro_recall": micro_recall, "tag_micro_f1": micro_f1}


def _normalize_text(text: str) -> str:
    """Case-folded, with every run of whitespace (line breaks too) one space and the ends stripped."""
    return " ".join(text.casefold().split())


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Exact match and ROUGE-L F-measure of free text, each a mean over examples.

    Exact match compares the texts after case-folding and whitespace normalisation (runs of
    whitespace, line breaks included, are one space; the ends are stripped); punctuation counts.
    ROUGE-L is the F-measure of the longest common subsequence of words (``rouge-score``, default
    tokenizer, no stemming; see the module docstring): with LCS length L, a prediction of p words
    and a reference of r, precision L/p, recall L/r, F = 2PR/(P+R); 0 when either side has no
    words (two empty texts: exact match 1, ROUGE-L 0).

    Args:
        predictions: generated texts, one per example.
        references: reference texts, one per example.

    Returns:
        ``examples`` (count), ``exact_match`` and ``rouge_l``.

    Raises:
        ValueError: no examples, or not as many predictions as references.
    """
    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    exact, rouge_l = [], []
    for prediction, reference in zip(predictions, references, strict=True):
        exact.append(float(_normalize_text(prediction) == _normalize_text(reference)))
        rouge_l.append(scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure)
    return {"examples": len(references), "exact_match": _mean(exact), "rouge_l": _mean(rouge_l)}


def detect_kind(references: Sequence[str]) -> str:
    """'tags' when the references are tag lists, else 'text'.

    The references are tag lists when every tag of every reference (:func:`tag_set`) has at most
    `MAX_TAG_WORDS` words and no sentence punctuation (``. ! ? ; :`` or a double quote), and at least
    one reference holds two tags or more (so that one-name answers such as "Oscar Wilde," stay text).
    Empty references fit either kind. Tags with a dot ("node.js") make the references text: pass
    ``kind="tags"`` to :func:`task_scores` for them.

    Args:
        references: the reference texts.

    Returns:
        "tags" or "text".
    """
    sets = [tag_set(reference) for reference in references]
    all_tags = all(len(tag.split()) <= MAX_TAG_WORDS and not _SENTENCE_PUNCTUATION.search(tag)
                   for tags in sets for tag in tags)
    return "tags" if all_tags and any(len(tags) >= 2 for tags in sets) else "text"


def task_scores(predictions: Sequence[str], references: Sequence[str], kind: str = "auto") -> dict[str, str | float | int]:
    """The task metrics of generations: :func:`tag_scores` or :func:`text_scores`, with the kind chosen.

    Args:
        predictions: generated texts, one per example.
        references: reference texts, one per example.
        kind: "tags", "text", or "auto": :func:`detect_kind` of the references.

    Returns:
        A flat dict: ``kind`` ("tags" or "text"), ``examples`` (count) and the metrics of that kind
        (see :func:`tag_scores` and :func:`text_scores`), each in [0, 1].

    Raises:
        ValueError: an unknown `kind`, no examples, or not as many predictions as references.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = detect_kind(references)
    scores = tag_scores(predictions, references) if kind == "tags" else text_scores(predictions, references)
    return {"kind": kind, **scores}
