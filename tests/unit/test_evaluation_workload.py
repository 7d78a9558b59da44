"""Workload construction: splits, Zipf skew, Poisson arrivals, near-duplicate phrasings."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from echolm.datasets import TaskItem
from echolm.evaluation.workload import (
    GSM8K_INSTRUCTION,
    GSM8K_PROGRAM_INSTRUCTION,
    camel_case,
    gsm8k_numbers_workload,
    gsm8k_workload,
    jsonl_items,
    jsonl_workload,
    mbpp_workload,
    poisson_arrivals,
    with_camel_case_names,
    zipf_sample,
    zipf_weights,
)


def _gsm(n: int) -> list[TaskItem]:
    return [TaskItem(f"g{i}", f"g{i}", f"question {i}", f"#### {i}", str(i), (), None) for i in range(n)]


def _mbpp(n: int) -> tuple[list[TaskItem], list[TaskItem]]:
    python = [TaskItem(f"mbpp-python-{i}", f"mbpp-{i}",
                       f"Write a Python function f{i}.\nYour code should pass this test:\nassert f{i}(1) == 1",
                       "def f(): pass", None, (f"assert f{i}(1) == 1", f"assert f{i}(2) == 2"), "python")
              for i in range(n)]
    others = [TaskItem(f"mbpp-go-{i}", f"mbpp-{i}", f"Write a Go function f{i}.", "func f() {}", None, (), "go")
              for i in range(n)]
    return python, others


def test_zipf_weights_decrease_and_sum_to_one() -> None:
    weights = zipf_weights(10, 1.1)
    assert weights.sum() == pytest.approx(1.0)
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))
    assert weights[0] / weights[1] == pytest.approx(2**1.1)


def test_zipf_sample_favours_the_first_ranks() -> None:
    draws = zipf_sample([str(i) for i in range(50)], 5000, 1.1, random.Random(0))
    assert draws.count("0") > draws.count("1") > draws.count("10") > 0


def test_poisson_arrivals_have_the_requested_rate() -> None:
    arrivals = poisson_arrivals(20_000, 2.0, seed=1)
    assert np.all(np.diff(arrivals) > 0)
    assert len(arrivals) / arrivals[-1] == pytest.approx(2.0, rel=0.05)


def test_gsm8k_split_keeps_cache_and_traffic_apart_and_asks_for_a_final_line() -> None:
    workload = gsm8k_workload(_gsm(100), n_cache=20, n_pool=30, n_traffic=50, seed=3)
    assert len(workload.cache) == 20 and len(workload.traffic) == 50
    assert not {c.group for c in workload.cache} & {t.group for t in workload.traffic}
    assert len(workload.unique_traffic) < 50  # Zipf repeats popular questions
    assert all(item.prompt.endswith(GSM8K_INSTRUCTION) for item in workload.cache + workload.traffic)
    assert workload == gsm8k_workload(_gsm(100), n_cache=20, n_pool=30, n_traffic=50, seed=3)


def test_mbpp_traffic_is_python_with_another_shown_test_and_covers_cached_tasks() -> None:
    python, others = _mbpp(40)
    workload = mbpp_workload(python, others, n_cache=20, n_unseen=10, n_traffic=60, python_cache_share=0.5, seed=0)
    assert {c.language for c in workload.cache} == {"python", "go"}
    assert all(t.language == "python" and t.tests for t in workload.traffic)
    assert all("assert f" in t.prompt and "(2) == 2" in t.prompt for t in workload.traffic)
    cached_groups = {c.group for c in workload.cache}
    assert any(t.group in cached_groups for t in workload.traffic)
    assert any(t.group not in cached_groups for t in workload.traffic)


@pytest.mark.parametrize(("name", "expected"), [
    ("similar_elements", "similarElements"),
    ("count_Odd_Squares", "countOddSquares"),
    ("is_prime_2", "isPrime2"),
    ("cube", "cube"),
    ("_private", "_private"),
])
def test_camel_case(name: str, expected: str) -> None:
    assert camel_case(name) == expected


def test_camel_case_variant_renames_the_tested_function_in_prompt_and_asserts_only() -> None:
    item = TaskItem(
        "mbpp-python-1", "mbpp-1",
        "Write a function.\nYour code should pass this test:\nassert sum_pairs([1, 2]) == 3",
        "def sum_pairs(xs):\n    return helper_fn(xs)\n\ndef helper_fn(xs):\n    return sum(xs)",
        None, ("assert sum_pairs([1, 2]) == 3", "assert sum_pairs([]) == 0  # sum_pairs_total stays"), "python")

    variant = with_camel_case_names(item)

    assert variant.id == "mbpp-python-1-camel" and variant.group == item.group
    assert "assert sumPairs([1, 2]) == 3" in variant.prompt and "sum_pairs(" not in variant.prompt
    assert variant.tests == ("assert sumPairs([1, 2]) == 3", "assert sumPairs([]) == 0  # sum_pairs_total stays")
    # The reference, renamed the same way, still passes: the variant asks for the same behaviour.
    namespace: dict[str, object] = {}
    exec(item.reference + "\nsumPairs = sum_pairs", namespace)  # noqa: S102 - trusted test data
    for test in variant.tests:
        exec(test, namespace)  # noqa: S102


def test_camel_case_variant_leaves_tasks_without_snake_case_names_alone() -> None:
    item = TaskItem("p", "g", "assert cube(2) == 8", "def cube(x):\n    return x ** 3", None, ("assert cube(2) == 8",),
                    "python")
    assert with_camel_case_names(item) is item


def test_mbpp_camel_traffic_has_the_same_split_with_renamed_functions() -> None:
    python, others = _mbpp(30)
    python = [TaskItem(t.id, t.group, t.prompt.replace(f"f{i}(", f"fn_{i}("), f"def fn_{i}(x):\n    return x", None,
                       tuple(x.replace(f"f{i}(", f"fn_{i}(") for x in t.tests), "python")
              for i, t in enumerate(python)]
    plain = mbpp_workload(python, others, n_cache=20, n_unseen=10, n_traffic=60, seed=0)
    camel = mbpp_workload(python, others, n_cache=20, n_unseen=10, n_traffic=60, seed=0, camel_case_traffic=True)

    assert camel.name == "mbpp-camel" and camel.cache == plain.cache
    assert [t.group for t in camel.traffic] == [t.group for t in plain.traffic]
    assert all(t.id.endswith("-camel") and "fn_" not in t.prompt and "fn" in t.prompt for t in camel.traffic)


def test_limited_truncates_cache_and_traffic() -> None:
    workload = gsm8k_workload(_gsm(100), n_cache=20, n_pool=30, n_traffic=50).limited(5)
    assert len(workload.cache) == 5 and len(workload.traffic) == 5


def test_jsonl_workload_reads_prompts_references_and_picks_the_verifier(tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1?", "reference": "2", "answer": "2"}\n\n'
                    '{"prompt": "2+2?", "reference": "4", "answer": "4", "group": "sums"}\n'
                    '{"prompt": "3+3?", "reference": "6", "answer": "6", "group": "sums"}\n')
    items = jsonl_items(path)
    assert [i.id for i in items] == ["line-1", "line-3", "line-4"]
    workload = jsonl_workload(items, name="mine", n_cache=1, n_traffic=4)
    assert workload.verifier == "numeric"
    with pytest.raises(ValueError, match="prompt"):
        (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
        jsonl_items(tmp_path / "bad.jsonl")


def _gsm_docs(n: int) -> list[dict[str, object]]:
    """Problems with traceable arithmetic (``a`` apples at ``b`` dollars each), plus one that is not."""
    docs: list[dict[str, object]] = [
        {"id": i, "question": f"Tom buys {20 + i} apples at ${5 + i % 7} each. How much does he pay?",
         "answer": f"{20 + i}*{5 + i % 7}=<<{20 + i}*{5 + i % 7}={(20 + i) * (5 + i % 7)}>>\n"
                   f"#### {(20 + i) * (5 + i % 7)}",
         "short_answer": str((20 + i) * (5 + i % 7))}
        for i in range(n)
    ]
    docs.append({"id": n, "question": "Half of the 10 cats left.", "answer": "It is 5.\n#### 5", "short_answer": "5"})
    return docs


def test_gsm8k_numbers_caches_published_problems_and_asks_them_again_with_other_numbers() -> None:
    workload = gsm8k_numbers_workload(_gsm_docs(30), n_cache=10, n_unseen=5, n_traffic=40, seed=3)
    assert workload.name == "gsm8k-numbers" and workload.verifier == "numeric"
    assert all(item.prompt.endswith(GSM8K_INSTRUCTION) for item in (*workload.cache, *workload.traffic))
    assert "gsm8k-30" not in {item.group for item in workload.cache}  # the untraceable problem is left out
    cached = {item.group: item for item in workload.cache}
    assert {item.group for item in workload.traffic} & set(cached)
    for request in workload.traffic:
        apples, price = (int(n) for n in re.findall(r"\d+", request.prompt.split("\n")[0]))
        assert request.answer == str(apples * price)  # each request's own numbers, its own answer
        if request.group in cached:
            assert request.prompt != cached[request.group].prompt
    # Requests of one problem differ from each other: a verbatim cache never has the answer.
    per_group: dict[str, set[str]] = {}
    for request in workload.traffic:
        per_group.setdefault(request.group, set()).add(request.prompt)
    popular = max(per_group.values(), key=len)
    assert len(popular) > 3
    assert len(workload.unique_traffic) == sum(len(prompts) for prompts in per_group.values())
    again = gsm8k_numbers_workload(_gsm_docs(30), n_cache=10, n_unseen=5, n_traffic=40, seed=3)
    assert again == workload  # deterministic


def test_gsm8k_numbers_program_asks_the_same_requests_for_a_program() -> None:
    prose = gsm8k_numbers_workload(_gsm_docs(30), n_cache=10, n_unseen=5, n_traffic=40, seed=3)
    program = gsm8k_numbers_workload(_gsm_docs(30), n_cache=10, n_unseen=5, n_traffic=40, seed=3, as_program=True)
    assert program.name == "gsm8k-numbers-program" and program.verifier == "program-output"
    for asked, as_prose in zip((*program.cache, *program.traffic), (*prose.cache, *prose.traffic), strict=True):
        assert asked.prompt == as_prose.prompt.replace(GSM8K_INSTRUCTION, GSM8K_PROGRAM_INSTRUCTION)
        assert (asked.id, asked.answer) == (as_prose.id, as_prose.answer)  # same split, same numbers
