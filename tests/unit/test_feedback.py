"""Feedback lines: the three forms, their validation messages, content ids, and outcomes per answer."""

from __future__ import annotations

import json

import pytest

from echolm.feedback import FeedbackInput, content_id, parse_feedback_line, parse_feedback_lines, wire_record
from echolm.history.feedback_store import Feedback, outcomes_from_feedback


@pytest.mark.parametrize("rating, quality, score", [("up", 1.0, 1.0), ("down", 0.0, -1.0), (True, 1.0, 1.0),
                                                     (-1, 0.0, -1.0), ("+1", 1.0, 1.0), ("thumbs_down", 0.0, -1.0)])
def test_thumbs_map_to_full_or_no_quality(rating, quality, score):
    item = FeedbackInput(request_id="r1", rating=rating).to_feedback()
    assert (item.kind, item.quality, item.score, item.request_id, item.source) == ("thumbs", quality, score, "r1", "user")


def test_scalar_score_is_placed_in_its_range():
    item = parse_feedback_line('{"request_id": "r1", "score": 4, "score_min": 1, "score_max": 5}').to_feedback()
    assert item.kind == "score" and item.quality == pytest.approx(0.75) and item.score == 4
    assert parse_feedback_line('{"request_id": "r2", "score": 0.2}').to_feedback().quality == pytest.approx(0.2)


def test_pairwise_between_two_requests_is_stored_about_b():
    item = parse_feedback_line('{"request_id_a": "ra", "request_id_b": "rb", "preferred": "a"}').to_feedback()
    assert item.kind == "pairwise" and item.request_id == "rb" and item.other_request_id == "ra"
    assert item.score == -2.0 and item.quality == pytest.approx(1 / 6)  # B lost: (-2 + 3) / 6


def test_pairwise_between_two_tiers_of_one_request_keeps_both_tiers():
    item = parse_feedback_line('{"request_id": "r", "tier_a": "large", "tier_b": "small", "score": 1.5}').to_feedback()
    assert (item.request_id, item.tier, item.other_request_id, item.other_tier) == ("r", "small", None, "large")
    assert item.quality == pytest.approx(0.75)
    tie = parse_feedback_line('{"request_id": "r", "tier_a": "large", "tier_b": "small", "preferred": "tie"}')
    assert tie.to_feedback().quality == pytest.approx(0.5)


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"request_id": "r"}', "no feedback"),
    ('{"rating": "up"}', "thumbs feedback needs request_id"),
    ('{"request_id": "r", "rating": "meh"}', "rating"),
    ('{"request_id": "r", "score": 7}', "outside [0.0, 1.0]"),
    ('{"request_id": "r", "score": 1, "score_min": 2, "score_max": 1}', "must exceed"),
    ('{"request_id_a": "a", "preferred": "b"}', "needs both request_id_a and request_id_b"),
    ('{"request_id_a": "a", "request_id_b": "b"}', "exactly one of preferred"),
    ('{"request_id_a": "a", "request_id_b": "b", "score": 4}', "in [-3, 3]"),
    ('{"request_id": "r", "tier_a": "x", "tier_b": "x", "preferred": "a"}', "must differ"),
    ('{"request_id": "r", "preferred": "a"}', "needs request_id_a and request_id_b, or request_id with tier_a"),
    ('{"request_id": "r", "rating": "up", "score": 1}', "either rating or score"),
    ('{"request_id": "r", "rating": "up", "extra": 1}', "extra: Extra inputs are not permitted"),
    ('{"request_id": "r", "rating": "up", "tenant": "bad tenant!"}', "tenant"),
])
def test_invalid_lines_are_rejected_with_a_clear_reason(line, problem):
    with pytest.raises(ValueError, match=None) as error:
        parse_feedback_line(line)
    assert problem in str(error.value)


def test_lines_are_validated_one_by_one_with_line_numbers():
    lines = ['{"request_id": "r1", "rating": "up"}', "", "oops", '{"request_id": "r2", "score": 0.5}', '{}']
    accepted, rejected = parse_feedback_lines(lines)
    assert [a.request_id for a in accepted] == ["r1", "r2"]
    assert [number for number, _ in rejected] == [3, 5]


def test_ids_derive_from_content_so_duplicates_collapse_and_given_ids_win():
    one = FeedbackInput(request_id="r1", rating="up").to_feedback()
    again = FeedbackInput(request_id="r1", rating="up", comment="same verdict, other words").to_feedback()
    other = FeedbackInput(request_id="r1", rating="down").to_feedback()
    assert one.feedback_id == again.feedback_id == content_id(one) != other.feedback_id
    assert FeedbackInput(request_id="r1", rating="up", feedback_id="mine").to_feedback().feedback_id == "mine"
    wired = json.loads(wire_record(FeedbackInput(request_id="r1", rating="up")))
    assert wired["feedback_id"] == one.feedback_id and FeedbackInput.model_validate(wired).to_feedback() == one


def test_outcomes_average_per_answer_and_give_the_other_side_of_a_pair_one_minus_quality():
    rows = [
        Feedback("f1", "r1", "thumbs", "user", 1.0, 1.0),                                # about r1's logged tier
        Feedback("f2", "r1", "score", "user", 0.5, 0.5),
        Feedback("f3", "r1", "pairwise", "judge", 1.5, 0.75, tier="small", other_tier="large"),
        Feedback("f4", "rb", "pairwise", "user", -2.0, 1 / 6, other_request_id="ra"),
        Feedback("f5", "unknown", "thumbs", "user", 1.0, 1.0),                           # tier cannot be known
    ]
    tiers = {"r1": "small", "ra": "large", "rb": "small"}
    found = {(o.request_id, o.tier): (round(o.quality, 4), o.n) for o in outcomes_from_feedback(rows, tiers)}
    assert found == {("r1", "small"): (round((1.0 + 0.5 + 0.75) / 3, 4), 3), ("r1", "large"): (0.25, 1),
                     ("rb", "small"): (round(1 / 6, 4), 1), ("ra", "large"): (round(5 / 6, 4), 1)}


def test_quality_must_be_normalised():
    with pytest.raises(ValueError):
        Feedback("f", "r", "score", "user", 2.0, 2.0)
