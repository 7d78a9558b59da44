"""Task verifiers for data with references (the autorater for math and code; issue: "task verifiers").

* ``numeric_answer_match``: GSM8K-style final-number comparison.
* ``run_python_tests``: runs a model's code and its tests in a separate, resource-limited interpreter.
* ``program_answer_match``: runs a model's program (program-of-thought math) there and checks the number
  it prints.

The sandbox limits resources and isolates the interpreter (``-I``, a temporary working directory, a
minimal environment, stdin closed, CPU time, address space, file size and core dumps limited, the whole
process group killed at the wall-clock timeout). It is not a security boundary against hostile code:
run it where a misbehaving model answer cannot reach anything valuable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Verdict:
    """``score`` in [0, 1] (fraction of tests passed, or 1/0 for an answer match)."""

    passed: bool
    score: float
    detail: str


# A number: optional sign and dollar sign, digits with proper thousands separators or plain, optional
# decimals, optional "/denominator". The look-behind keeps "x2" or "3.5.1"-like fragments out.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212]?)\$?\s?(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?(?:/(?P<den>\d+))?(?!\w)"
)
_ANSWER_MARKERS = (
    re.compile(r"####"),
    re.compile(r"\\boxed\s*\{"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)", re.IGNORECASE),
)


def _numbers(text: str) -> list[Fraction]:
    found: list[Fraction] = []
    for m in _NUMBER.finditer(text):
        if not m.group("int") and not m.group("frac"):
            continue
        value = Fraction((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
        if m.group("den"):
            den = int(m.group("den"))
            if den == 0:
                continue
            value /= den
        found.append(-value if m.group("sign") else value)
    return found


def extract_final_number(text: str) -> Fraction | None:
    """The answer number of a response: the first number after the last "####", "\\boxed{" or
    "answer is"/"answer:" marker (tried in that order), else the last number in the text."""
    for marker in _ANSWER_MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            after = _numbers(text[hits[-1].end() :])
            if after:
                return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numeric_answer_match(response: str, reference: str, rel_tol: float = 1e-6) -> Verdict:
    """Does the response's final number equal the reference's (a bare number or a "#### n" solution)?"""
    expected = extract_final_number(reference)
    if expected is None:
        raise ValueError(f"reference has no number: {reference[-80:]!r}")
    got = extract_final_number(response)
    if got is None:
        return Verdict(False, 0.0, f"no number in response; expected {_show(expected)}")
    ok = got == expected or math.isclose(float(got), float(expected), rel_tol=rel_tol, abs_tol=1e-9)
    return Verdict(ok, 1.0 if ok else 0.0, f"expected {_show(expected)}, got {_show(got)}")


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):g}"


_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a model answer: the first fenced block tagged python (or untagged) that defines
    something, else the first python/untagged block, else the first block, else the whole text."""
    blocks = [(m.group("lang").lower(), m.group("body")) for m in _FENCE.finditer(text)]
    if not blocks:
        return text.strip()
    python = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    defining = [body for body in python if re.search(r"^\s*(def|class)\s", body, re.MULTILINE)]
    return (defining or python or [blocks[0][1]])[0].strip()


_HARNESS = r"""
import json, resource, sys
payload = json.load(open("payload.json"))
cpu, mem, fsize = payload["cpu_s"], payload["memory_bytes"], payload["file_bytes"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
marker = payload["marker"]
def report(*fields):
    sys.__stdout__.write(marker + " " + " ".join(str(f) for f in fields) + "\n")
    sys.__stdout__.flush()
namespace = {"__name__": payload["module_name"]}
try:
    exec(compile(payload["code"], "solution.py", "exec"), namespace)
except BaseException as exc:
    report("error", type(exc).__name__)
    raise
for index, test in enumerate(payload["tests"]):
    try:
        exec(compile(test, "test_%d.py" % index, "exec"), namespace)
        report("pass", index)
    except BaseException as exc:
        report("fail", index, type(exc).__name__)
"""


def run_python_tests(
    code: str,
    tests: str | Sequence[str],
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    *,
    setup: str = "",
    extract: bool = True,
    max_output_bytes: int = 1_000_000,
) -> Verdict:
    """Run ``code`` (extracted from markdown fences when ``extract``) then ``tests`` in a sandboxed child.

    ``tests`` is one script or a list of them (e.g. MBPP's asserts), each run separately so the score is
    the fraction that passed; ``setup`` runs before the code (MBPP's ``test_setup_code``). Limits: CPU
    time ``ceil(timeout_s) + 1`` seconds, address space ``memory_mb``, files ``max_output_bytes``, wall clock
    ``timeout_s`` (then the process group is killed). The limits are set by the child itself, first
    thing, before any untrusted code runs: ``preexec_fn`` is not safe in a process with threads (an
    asyncio service has a thread pool), and the effect is the same.
    """
    test_list = [tests] if isinstance(tests, str) else list(tests)
    if not test_list:
        raise ValueError("no tests to run")
    program = (setup + "\n" if setup else "") + (extract_code(code) if extract else code)
    run = _run_sandboxed(program, test_list, timeout_s, memory_mb, max_output_bytes)
    return _verdict(run.stdout, run.stderr, run.marker, len(test_list), run.returncode, run.timed_out, timeout_s)


@dataclass(frozen=True, slots=True)
class _SandboxRun:
    stdout: str  # the program's output with the harness's marker lines in it
    stderr: str
    marker: str
    returncode: int | None
    timed_out: bool

    @property
    def program_output(self) -> str:
        """What the program itself printed (the harness's marker lines removed)."""
        return "\n".join(line for line in self.stdout.splitlines() if not line.startswith(self.marker + " "))


def _run_sandboxed(program: str, tests: Sequence[str], timeout_s: float, memory_mb: int, max_output_bytes: int,
                   module_name: str = "__solution__") -> _SandboxRun:
    """``program`` then each of ``tests`` in the sandbox (module docstring), as module ``module_name``
    (``__main__`` runs a program's ``if __name__ == "__main__":`` block; MBPP solutions must not)."""
    marker = "@@echolm-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="echolm-verify-") as workdir:
        work = Path(workdir)
        payload = {
            "code": program,
            "tests": list(tests),
            "marker": marker,
            "module_name": module_name,
            # One second above the wall clock, so a busy loop normally ends as a (clearer) timeout.
            "cpu_s": math.ceil(timeout_s) + 1,
            "memory_bytes": memory_mb * 1024 * 1024,
            "file_bytes": max_output_bytes,
        }
        (work / "payload.json").write_text(json.dumps(payload))
        (work / "harness.py").write_text(_HARNESS)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": workdir,
            "TMPDIR": workdir,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "harness.py"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        stdout = _read_head(work / "stdout", max_output_bytes)
        stderr = _read_head(work / "stderr", max_output_bytes)
    return _SandboxRun(stdout, stderr, marker, proc.returncode, timed_out)


def program_answer_match(response: str, reference: str, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """A program-of-thought answer: run the response's Python code in the sandbox and compare the last
    number it prints with the reference's final number (``numeric_answer_match``). An answer without a
    fenced code block, a program that fails or prints no number does not pass: the asker wanted a
    program, and a program that does not run is no answer."""
    if not _FENCE.search(response):
        return Verdict(False, 0.0, "no fenced code block in the answer")
    run = _run_sandboxed(extract_code(response), ["pass"], timeout_s, memory_mb, 1_000_000, module_name="__main__")
    if run.timed_out or run.returncode != 0:
        failed = _verdict(run.stdout, run.stderr, run.marker, 1, run.returncode, run.timed_out, timeout_s)
        return Verdict(False, 0.0, f"program failed: {failed.detail}")
    printed = [line for line in run.program_output.splitlines() if line.strip()]
    if not printed or extract_final_number(printed[-1]) is None:
        return Verdict(False, 0.0, f"the program printed no number last: {_last_line(run.program_output)}")
    match = numeric_answer_match(printed[-1], reference)
    return Verdict(match.passed, match.score, f"program printed {printed[-1][:80]!r}; {match.detail}")


async def run_python_tests_async(
    code: str, tests: str | Sequence[str], timeout_s: float = 10.0, memory_mb: int = 512, *, setup: str = ""
) -> Verdict:
    """``run_python_tests`` in a worker thread (it blocks for at most ``timeout_s`` plus cleanup)."""
    return await asyncio.to_thread(run_python_tests, code, tests, timeout_s, memory_mb, setup=setup)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)


def _read_head(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _verdict(
    stdout: str, stderr: str, marker: str, n_tests: int, returncode: int | None, timed_out: bool, timeout_s: float
) -> Verdict:
    reports = [line[len(marker) + 1 :].split() for line in stdout.splitlines() if line.startswith(marker + " ")]
    passed = {int(r[1]) for r in reports if r[0] == "pass"}
    failed = [r for r in reports if r[0] == "fail"]
    errored = [r for r in reports if r[0] == "error"]
    score = len(passed) / n_tests
    ok = len(passed) == n_tests and returncode == 0 and not timed_out
    if timed_out or returncode == -signal.SIGXCPU:
        detail = f"timeout after {timeout_s:g}s ({len(passed)}/{n_tests} tests passed before)"
    elif errored:
        detail = f"solution raised {errored[0][1]}: {_last_line(stderr)}"
    elif failed:
        detail = f"{len(passed)}/{n_tests} tests passed; first failure: test {failed[0][1]} ({failed[0][2]})"
    elif returncode != 0:
        detail = f"interpreter exited with {_describe_exit(returncode)}: {_last_line(stderr)}"
    else:
        detail = f"{len(passed)}/{n_tests} tests passed"
    return Verdict(ok, score, detail)


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"code {returncode}"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"
