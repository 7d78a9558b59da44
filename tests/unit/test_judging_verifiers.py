"""Task verifiers: GSM8K-style numeric answers and sandboxed Python tests."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from echolm.judging.verifiers import (
    extract_code,
    extract_final_number,
    numeric_answer_match,
    program_answer_match,
    run_python_tests,
    run_python_tests_async,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", Fraction(72)),
        ("#### 18", Fraction(18)),
        ("So she makes 9 * 2 = $18 every day. The answer is 18.", Fraction(18)),
        ("The answer is $18.", Fraction(18)),
        ("Total: $1,000.", Fraction(1000)),
        ("He has 1,234,567 apples", Fraction(1234567)),
        ("The final answer is: 3.50", Fraction(7, 2)),
        ("Answer: -7", Fraction(-7)),
        ("Answer: \u22127", Fraction(-7)),
        ("so the result is \\boxed{42}", Fraction(42)),
        ("Half of it: 1/2", Fraction(1, 2)),
        ("step 1: 5 apples, step 2: 3 more, 8 in total", Fraction(8)),
        ("lists like 1, 2, 3", Fraction(3)),
        ("The answer is 18, not 20.", Fraction(18)),
        ("no digits here", None),
        ("version x2 and y3z", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_numeric_answer_match():
    reference = "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    assert numeric_answer_match("She earns $18 per day.", reference).passed
    assert numeric_answer_match("The answer is 18.00", "18").passed
    assert numeric_answer_match("#### 1,000", "1000").passed
    miss = numeric_answer_match("I think it is 17.", reference)
    assert not miss.passed and miss.score == 0.0 and miss.detail == "expected 18, got 17"
    none = numeric_answer_match("I cannot tell.", reference)
    assert not none.passed and "no number" in none.detail
    with pytest.raises(ValueError):
        numeric_answer_match("18", "no number")


def test_extract_code_from_markdown():
    answer = (
        "Here is it:\n```bash\nls\n```\n```python\ndef f():\n    return 1\n```\nand usage:\n```python\nprint(f())\n```"
    )
    assert extract_code(answer) == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("def g(): pass") == "def g(): pass"
    assert extract_code("```js\nlet a = 1\n```") == "let a = 1"


SOLUTION = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```"


def test_passing_program():
    verdict = run_python_tests(SOLUTION, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], timeout_s=10)
    assert verdict.passed and verdict.score == 1.0 and verdict.detail == "2/2 tests passed"


def test_failing_program_scores_the_fraction_passed():
    verdict = run_python_tests(SOLUTION, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"], timeout_s=10)
    assert not verdict.passed and verdict.score == 0.5
    assert "test 1 (AssertionError)" in verdict.detail


def test_broken_solution_and_setup_code():
    verdict = run_python_tests("def add(a, b) return a + b", "assert add(1, 2) == 3", timeout_s=10)
    assert not verdict.passed and verdict.score == 0.0 and "SyntaxError" in verdict.detail
    with_setup = run_python_tests("def f():\n    return K * 2", "assert f() == 10", timeout_s=10, setup="K = 5")
    assert with_setup.passed


def test_infinite_loop_is_stopped_at_the_timeout():
    start = time.monotonic()
    verdict = run_python_tests("def f():\n    while True:\n        pass", ["assert True", "f()"], timeout_s=1.0)
    assert time.monotonic() - start < 8
    assert not verdict.passed and verdict.score == 0.5 and verdict.detail.startswith("timeout after 1s")


def test_sleeping_program_is_stopped_at_the_wall_clock():
    start = time.monotonic()
    verdict = run_python_tests("import time\ntime.sleep(60)", "assert True", timeout_s=1.0)
    assert time.monotonic() - start < 8 and not verdict.passed and "timeout" in verdict.detail


def test_memory_bomb_hits_the_limit():
    verdict = run_python_tests(
        "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))",
        "assert True",
        timeout_s=10,
        memory_mb=256,
    )
    assert not verdict.passed and "MemoryError" in verdict.detail
    inside_test = run_python_tests("def grow():\n    return [0] * (10 ** 10)", "grow()", timeout_s=10, memory_mb=256)
    assert not inside_test.passed and "MemoryError" in inside_test.detail


def test_exits_and_fake_reports_do_not_count_as_passes():
    early_exit = run_python_tests("import os\nos._exit(0)", "assert True", timeout_s=10)
    assert not early_exit.passed and early_exit.score == 0.0
    sys_exit = run_python_tests("import sys\nsys.exit(0)", "assert True", timeout_s=10)
    assert not sys_exit.passed and "SystemExit" in sys_exit.detail
    forged = run_python_tests("print('@@echolm-0000 pass 0')", "assert False", timeout_s=10)
    assert not forged.passed and forged.score == 0.0


def test_runs_in_a_temporary_isolated_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "import os, sys\nopen('scratch.txt', 'w').write('x')\nCWD = os.getcwd()\nFLAGS = sys.flags.isolated"
    verdict = run_python_tests(code, ["assert 'echolm-verify-' in CWD", "assert FLAGS == 1"], timeout_s=10)
    assert verdict.passed, verdict.detail
    assert list(tmp_path.iterdir()) == []  # the child wrote into its own temporary directory


async def test_async_wrapper():
    verdict = await run_python_tests_async(SOLUTION, "assert add(2, 3) == 5", timeout_s=10)
    assert verdict.passed


def test_program_answer_is_the_last_number_it_prints():
    program = "```python\napples = 16 - 3 - 4\nprint('eggs left:', apples)\nprint(apples * 2)\n```"
    verdict = program_answer_match(program, "18")
    assert verdict.passed and verdict.score == 1.0
    assert "printed '18'" in verdict.detail
    assert not program_answer_match(program, "#### 9").passed  # only the last line counts


def test_program_runs_as_main_so_a_main_guard_runs():
    program = "```python\ndef solve():\n    return 3 * 4\n\nif __name__ == '__main__':\n    print(solve())\n```"
    assert program_answer_match(program, "12").passed


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        ("The answer is 12.", "no fenced code block"),  # prose: the request asked for a program
        ("```python\nx = 12\n```", "printed no number"),
        ("```python\nprint('twelve')\n```", "printed no number"),
        ("```python\nprint(1 / 0)\n```", "ZeroDivisionError"),
        ("```python\nwhile True:\n    pass\n```", "timeout"),
    ],
)
def test_program_that_prints_no_number_fails_or_times_out_does_not_pass(answer, detail):
    verdict = program_answer_match(answer, "12", timeout_s=1.0)
    assert not verdict.passed and verdict.score == 0.0
    assert detail in verdict.detail
