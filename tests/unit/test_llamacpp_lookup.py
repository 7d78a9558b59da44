"""The prompt lookup draft: which tokens it copies from the context."""

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from echolm.generation.llamacpp_lookup import PromptLookupDraft, lookup_draft  # noqa: E402


def ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.intc)


def test_drafts_what_followed_the_last_ngram_before() -> None:
    # "7 8" occurred before, followed by 9 10 11.
    context = ids(1, 7, 8, 9, 10, 11, 2, 7, 8)
    assert lookup_draft(context, max_ngram=2, n_draft=2).tolist() == [9, 10]
    assert lookup_draft(context, max_ngram=2, n_draft=10).tolist() == [9, 10, 11, 2, 7, 8]


def test_prefers_the_latest_occurrence() -> None:
    # "5" followed by 1 in the instructions, by 6 in the example answer nearer the end.
    context = ids(5, 1, 0, 5, 6, 0, 5)
    assert lookup_draft(context, max_ngram=1, n_draft=1).tolist() == [6]


def test_longest_ngram_wins_over_a_later_shorter_match() -> None:
    # The trigram "3 4 5" recurs only early (followed by 40); "4 5" alone recurs later (followed by 50).
    context = ids(3, 4, 5, 40, 0, 4, 5, 50, 9, 3, 4, 5)
    assert lookup_draft(context, max_ngram=3, n_draft=1).tolist() == [40]
    assert lookup_draft(context, max_ngram=2, n_draft=1).tolist() == [50]


def test_nothing_to_draft_without_a_recurrence() -> None:
    assert lookup_draft(ids(1, 2, 3, 4), max_ngram=3, n_draft=5).size == 0
    assert lookup_draft(ids(1), max_ngram=3, n_draft=5).size == 0
    assert lookup_draft(ids(), max_ngram=3, n_draft=5).size == 0


def test_the_match_at_the_end_itself_does_not_count() -> None:
    # The last token matches only itself: no earlier occurrence, no draft.
    assert lookup_draft(ids(1, 2, 3, 2, 9), max_ngram=1, n_draft=3).size == 0
    # An occurrence ending just before the last n-gram drafts the n-gram's own tokens (a repeat).
    assert lookup_draft(ids(4, 4, 4), max_ngram=1, n_draft=3).tolist() == [4]


def test_draft_model_counts_offered_tokens() -> None:
    draft = PromptLookupDraft(n_draft=2, max_ngram=2, min_ngram=2)
    assert draft(ids(1, 7, 8, 9, 10, 7, 8)).tolist() == [9, 10]
    assert draft(ids(1, 2, 3)).size == 0
    assert draft.stats.drafted == 2


def test_min_ngram_refuses_short_matches() -> None:
    # Only the unigram "8" recurs: drafted with min_ngram 1, not with 2.
    context = ids(8, 9, 1, 2, 8)
    assert lookup_draft(context, max_ngram=3, n_draft=1, min_ngram=1).tolist() == [9]
    assert lookup_draft(context, max_ngram=3, n_draft=1, min_ngram=2).size == 0
