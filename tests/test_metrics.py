"""minitune.metrics: tag set precision / recall / F1, exact match and ROUGE-L, against values worked out by hand."""

from __future__ import annotations

import pytest

from minitune.metrics import detect_kind, tag_scores, tag_set, task_scores, text_scores

TAG_KEYS = {"examples", "tag_precision", "tag_recall", "tag_f1", "tag_micro_precision", "tag_micro_recall",
            "tag_micro_f1"}


def _prf(scores: dict) -> tuple[float, float, float]:
    return scores["tag_precision"], scores["tag_recall"], scores["tag_f1"]


# ---------------------------------------------------------------------------------------------
# tags


def test_tag_set_normalises_case_spaces_hyphens_and_duplicates():
    assert tag_set(" Power-of_Words , books,, BOOKS,\tpower  of words ,") == {"power of words", "books"}
    assert tag_set("") == tag_set(" , ,") == frozenset()


def test_partial_overlap_precision_is_over_predicted_and_recall_over_reference():
    # predicted {books, reading, love}, reference {books, humor}: 1 hit
    # precision 1/3, recall 1/2, F1 = 2 * (1/3) * (1/2) / (1/3 + 1/2) = (1/3) / (5/6) = 2/5
    scores = tag_scores(["books, reading, love"], ["books, humor"])
    assert set(scores) == TAG_KEYS and scores["examples"] == 1
    assert _prf(scores) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    # one example: micro = macro
    assert (scores["tag_micro_precision"], scores["tag_micro_recall"], scores["tag_micro_f1"]) == pytest.approx(
        (1 / 3, 1 / 2, 2 / 5))


def test_duplicates_count_once_on_both_sides():
    # predicted {books} (3 times), reference {books, humor} (books twice): 1 hit
    # precision 1/1, recall 1/2, F1 = 2 * 1 * (1/2) / (3/2) = 2/3
    assert _prf(tag_scores(["books, Books, books"], ["books, humor, books"])) == pytest.approx((1, 1 / 2, 2 / 3))


def test_case_whitespace_and_hyphen_variants_match():
    # {power of words, reading} on both sides: 2 hits of 2 predicted and 2 relevant
    scores = tag_scores(["  Power  of-Words ,READING\n"], ["power-of-words, reading"])
    assert _prf(scores) == (1.0, 1.0, 1.0)


def test_empty_prediction_scores_zero():
    # 0 predicted tags: precision 0 by convention; 0 of 1 relevant found: recall 0; F1 0
    assert _prf(tag_scores([""], ["books"])) == (0.0, 0.0, 0.0)
    assert _prf(tag_scores([" , ,"], ["books"])) == (0.0, 0.0, 0.0)  # only empty tags: nothing predicted


def test_empty_reference_scores_zero_unless_the_prediction_is_empty_too():
    # 1 predicted, 0 relevant: precision 0/1 = 0, recall 0 by convention, F1 0
    assert _prf(tag_scores(["books"], [""])) == (0.0, 0.0, 0.0)
    # nothing to find and nothing predicted: perfect
    both_empty = tag_scores([""], [""])
    assert _prf(both_empty) == (1.0, 1.0, 1.0)
    assert both_empty["tag_micro_f1"] == 1.0


def test_macro_is_the_mean_over_examples_and_micro_pools_the_counts():
    # example 1: predicted {a, b, c, d}, reference {a}: 1 hit; P 1/4, R 1/1, F1 = 2 * (1/4) * 1 / (5/4) = 2/5
    # example 2: predicted {x}, reference {x, y}: 1 hit; P 1/1, R 1/2, F1 = 2 * 1 * (1/2) / (3/2) = 2/3
    scores = tag_scores(["a, b, c, d", "x"], ["a", "x, y"])
    assert scores["examples"] == 2
    # macro: P (1/4 + 1) / 2 = 5/8, R (1 + 1/2) / 2 = 3/4, F1 (2/5 + 2/3) / 2 = (6/15 + 10/15) / 2 = 8/15
    assert _prf(scores) == pytest.approx((5 / 8, 3 / 4, 8 / 15))
    # micro: 2 hits, 5 predicted, 3 relevant: P 2/5, R 2/3, F1 = 2 * (2/5) * (2/3) / (2/5 + 2/3) = (8/15) / (16/15) = 1/2
    assert (scores["tag_micro_precision"], scores["tag_micro_recall"], scores["tag_micro_f1"]) == pytest.approx(
        (2 / 5, 2 / 3, 1 / 2))


def test_an_empty_example_weighs_in_the_macro_mean():
    # example 1 perfect (1, 1, 1); example 2 empty prediction (0, 0, 0): macro (1/2, 1/2, 1/2)
    # micro: 1 hit, 1 predicted, 2 relevant: P 1, R 1/2, F1 2/3
    scores = tag_scores(["books", ""], ["books", "humor"])
    assert _prf(scores) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert scores["tag_micro_precision"] == 1.0 and scores["tag_micro_recall"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------
# text


def test_exact_match_ignores_case_and_whitespace_but_not_punctuation():
    reference = "Be yourself; everyone else is already taken."
    assert text_scores(["  be  yourself;\neveryone else is already TAKEN. "], [reference])["exact_match"] == 1.0
    assert text_scores(["Be yourself everyone else is already taken"], [reference])["exact_match"] == 0.0


def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence():
    reference = "the cat sat on the mat"  # 6 words
    # "The CAT, on... mat!" -> the cat on mat (4 words, case and punctuation dropped by the tokenizer)
    # LCS: the cat on mat = 4; P 4/4, R 4/6; F = 2 * 1 * (2/3) / (1 + 2/3) = (4/3) / (5/3) = 4/5
    assert text_scores(["The CAT, on... mat!"], [reference])["rouge_l"] == pytest.approx(4 / 5)
    # a cat sat on the warm mat today (8 words); LCS: cat sat on the mat = 5; P 5/8, R 5/6
    # F = 2 * (5/8) * (5/6) / (5/8 + 5/6) = (25/24) / (35/24) = 5/7
    assert text_scores(["a cat sat on the warm mat today"], [reference])["rouge_l"] == pytest.approx(5 / 7)


def test_rouge_l_counts_order_and_does_not_stem():
    # the same five words reversed: LCS 1 (unigram overlap would be 5); P = R = 1/5, F 1/5
    assert text_scores(["five four three two one"], ["one two three four five"])["rouge_l"] == pytest.approx(1 / 5)
    # no stemming: cat / cats and sleeps / sleep are different words: LCS 0
    assert text_scores(["cat sleeps"], ["cats sleep"])["rouge_l"] == 0.0


def test_text_scores_are_means_over_examples():
    # example 1: exact (1), ROUGE-L 1; example 2: not exact (0), ROUGE-L 4/5 (as above)
    scores = text_scores(["The cat sat on the mat", "The CAT, on... mat!"],
                         ["the cat sat on the mat", "the cat sat on the mat"])
    assert scores == {"examples": 2, "exact_match": pytest.approx(1 / 2), "rouge_l": pytest.approx((1 + 4 / 5) / 2)}


def test_empty_texts_match_exactly_but_have_no_words_for_rouge():
    assert text_scores([""], [" "]) == {"examples": 1, "exact_match": 1.0, "rouge_l": 0.0}


# ---------------------------------------------------------------------------------------------
# kind and task_scores


def test_detect_kind():
    assert detect_kind(["be-yourself, honesty, inspirational", "books, humor", ""]) == "tags"
    assert detect_kind(["the-perks-of-being-a-wallflower, books"]) == "tags"  # 6 words is still a tag
    assert detect_kind(["Be yourself; everyone else is already taken.", "So many books, so little time."]) == "text"
    assert detect_kind(["So many books, so little time.", "books, humor"]) == "text"  # "so little time." ends a sentence
    assert detect_kind(["node.js, python"]) == "text"  # documented: a dot is sentence punctuation
    # one name each, even with a trailing comma: text
    assert detect_kind(["Oscar Wilde", "China Miéville,"]) == "text"
    # one piece of 9 words among tag lists: text
    assert detect_kind(["books, humor", "a room without books is like a body without, soul"]) == "text"


def test_task_scores_picks_the_kind_and_returns_a_flat_dict_in_range():
    tags = task_scores(["books, love", "life"], ["books, humor", "life, love"])
    assert tags["kind"] == "tags" and set(tags) == TAG_KEYS | {"kind"}
    assert tags == {"kind": "tags", **tag_scores(["books, love", "life"], ["books, humor", "life, love"])}
    text = task_scores(["So many books."], ["So many books, so little time."])
    assert text["kind"] == "text" and set(text) == {"kind", "examples", "exact_match", "rouge_l"}
    for scores in (tags, text):
        assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k not in ("kind", "examples"))
    forced = task_scores(["books, humor"], ["books, humor"], kind="text")
    assert forced == {"kind": "text", "examples": 1, "exact_match": 1.0, "rouge_l": 1.0}


@pytest.mark.parametrize("call, message", [
    (lambda: task_scores(["a"], ["a"], kind="labels"), "kind='labels' is not one of auto, tags, text"),
    (lambda: task_scores(["a", "b"], ["a"]), "2 predictions but 1 references"),
    (lambda: tag_scores([], []), "no examples to score"),
    (lambda: text_scores([], []), "no examples to score"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
