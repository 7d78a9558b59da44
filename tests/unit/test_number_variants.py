"""GSM8K problems with new numbers: the annotated arithmetic re-run, and what must be refused."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from echolm.evaluation.number_variants import Untraceable, evaluate, format_like, new_value, parse_steps, vary

DUCKS_Q = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
           "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
           "fresh duck egg. How much in dollars does she make every day at the farmers' market?")
DUCKS_A = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
           "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18")


def test_the_new_answer_is_the_arithmetic_re_run_with_the_new_numbers() -> None:
    for draw in range(20):
        variant = vary(DUCKS_Q, DUCKS_A, "18", random.Random(draw))
        assert set(variant.changed) == {"16"}  # 2 is a small count, 3 and 4 are spelled out: kept
        eggs = int(variant.changed["16"])
        assert f"lay {eggs} eggs" in variant.question and "for $2 per" in variant.question
        assert variant.answer == str((eggs - 3 - 4) * 2)
        assert variant.solution.endswith(f"The answer is {variant.answer}.")
        assert f"{eggs}-3-4 = {eggs - 7}" in variant.solution


def test_a_chain_of_results_is_recomputed_and_thousands_keep_their_format() -> None:
    question = ("Josh buys a house for $80,000 and then puts in $50,000 in repairs. This increased the value of the "
                "house by 150%. How much profit did he make?")
    answer = ("80,000+50,000=$<<80000+50000=130000>>130,000\n80,000*1.5=<<80000*1.5=120000>>120,000\n"
              "120,000+80,000=$<<120000+80000=200000>>200,000\n200,000-130,000=$<<200000-130000=70000>>70,000\n"
              "#### 70000")
    variant = vary(question, answer, "70000", random.Random(3))
    house, repairs = (int(variant.changed.get(k, k).replace(",", "")) for k in ("80,000", "50,000"))
    assert variant.answer == str(house * Fraction(3, 2) - repairs)  # (1.5 h + h) - (h + r)
    assert all("," in new for new in variant.changed.values())


def test_an_operand_that_could_be_a_count_or_a_constant_is_never_changed() -> None:
    # "2 bolts ... half that much": 2/2 uses the input and the "half"; changing both would be wrong.
    with pytest.raises(Untraceable):
        vary("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
             "2/2=<<2/2=1>>1\n2+1=<<2+1=3>>3\n#### 3", "3", random.Random(0))


def test_an_earlier_result_equal_to_a_named_constant_is_refused_when_it_changes() -> None:
    # Dorothy's 4 friends (12 / 3) times "four times": which 4 is which is unknown.
    question = ("Charlie has three times as many Facebook friends as Dorothy. James has four times as many friends "
                "on Facebook as Dorothy. If Charlie has 12 friends on Facebook, how many does James have?")
    with pytest.raises(Untraceable):
        vary(question, "12 / 3 = <<12/3=4>>4\n4 * 4 = <<4*4=16>>16\n#### 16", "16", random.Random(0))


def test_a_constant_from_unannotated_reasoning_is_refused() -> None:
    # "12A + 8A = 20A" is not annotated: 20 depends on the price and would go stale.
    question = ("Large animals cost three times the small ones. She sold twice as many small as large and earned "
                "$120. Each small one costs $4. How many small ones did she sell?")
    answer = "3 * 4 = <<3*4=12>>12.\n120 / 20 = <<120/20=6>>6\n6 * 2 = <<6*2=12>>12\n#### 12"
    with pytest.raises(Untraceable, match="neither an input"):
        vary(question, answer, "12", random.Random(0))


def test_whole_counts_stay_whole() -> None:
    # 4-hour trips in 8 hours: every other hour count (6, 7, 9, 10, 11) makes a fractional number of
    # trips, so no variant is given rather than "1.5 trips".
    answer = "8/{trip}=<<8/{trip}={trips}>>{trips} trips\n24 / {trips} = <<24/{trips}={per}>>{per}\n#### {per}"
    question = "A trip takes {trip} hours. How many berries per trip to collect 24 berries in 8 hours?"
    for draw in range(10):
        with pytest.raises(Untraceable, match="whole"):
            vary(question.format(trip=4), answer.format(trip=4, trips=2, per=12), "12", random.Random(draw))
    # 2-hour trips: the even hour counts give whole trips, and only those are drawn.
    varied = []
    for draw in range(10):
        variant = vary(question.format(trip=2), answer.format(trip=2, trips=4, per=6), "6", random.Random(draw))
        varied.append(int(variant.changed.get("8", "8")))
    assert all(hours % 2 == 0 for hours in varied) and set(varied) != {8}


def test_solutions_whose_arithmetic_cannot_be_checked_are_refused() -> None:
    with pytest.raises(Untraceable, match="does not hold"):
        parse_steps("2+2=<<2+2=5>>5")
    with pytest.raises(Untraceable, match="no calculator"):
        vary("Tom has 15 apples.", "He has 15.\n#### 15", "15", random.Random(0))
    with pytest.raises(Untraceable, match="not the answer"):
        vary("Tom has 15 apples and 20 pears.", "15+20=<<15+20=35>>35\n#### 36", "36", random.Random(0))
    with pytest.raises(Untraceable, match="clock"):
        vary("The train leaves at 10:30 with 50 people.", "50*2=<<50*2=100>>100\n#### 100", "100", random.Random(0))


def test_exact_arithmetic_and_formatting() -> None:
    assert evaluate("1300*.1") == 130
    assert evaluate("(2+3)/4") == Fraction(5, 4)
    with pytest.raises(Untraceable):
        evaluate("__import__('os')")
    assert format_like(Fraction(56000), "80,000") == "56,000"
    assert format_like(Fraction(9, 4), "1.50") == "2.25"


def test_new_values_are_other_values_of_a_similar_size_and_kind() -> None:
    rng = random.Random(0)
    for original in ("5", "12", "50", "75", "1200", "10,000", "2.50"):
        value = Fraction(original.replace(",", ""))
        drawn = {new_value(original, rng) for _ in range(30)}
        assert len(drawn - {value}) >= 3, original  # several choices, so variants differ
        assert all(value / 3 <= d <= value * 2 for d in drawn if value > 12)
        if "." not in original:
            assert all(d.denominator == 1 for d in drawn)
