"""GSM8K problems with their numbers changed: near-duplicates whose answers differ.

A GSM8K solution carries calculator annotations (``<<16-3-4=9>>``) for its arithmetic. This module
draws new values for the question's numbers and re-runs the annotated arithmetic with them, so a
variant has a known answer without any model in the loop (the idea of GSM-Symbolic, done
mechanically instead of with hand-written templates). Teams' traffic looks like this: the same kind
of question asked again with other figures. A cached answer returned verbatim is then wrong, while
the cached worked solution, used as an example, shows how to solve it.

Only problems whose arithmetic can be traced are varied; for the rest ``vary`` raises ``Untraceable``:

* every annotation must evaluate to its stated result (plain ``+ - * /`` and parentheses);
* the last annotation's result must be the data set's answer;
* an operand of an annotation is an earlier annotation's result, else a number of the question,
  else a constant, and a constant must be 0, 1 or named by the question ("half" for 2, "%" for 100,
  "dozen" for 12: ``CONSTANT_WORDS``): any other constant may come from unannotated reasoning about
  a number that changes;
* only question numbers the annotations use, written once, and at least ``MIN_CHANGED`` are
  changed; a number that is also an earlier result, or that the question also names in words
  ("2 bolts ... half that much"), is ambiguous and kept;
* the new answer must be a positive integer, every step a number with at most two decimals, and a
  step whose original result is whole must stay whole (a count of trips cannot become 1.5).

Everything is exact (``fractions.Fraction``) and deterministic for a given ``random.Random``.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

# Digits with optional thousands separators and decimals, not part of a word ("5th", "x2") or a
# longer number; a leading "$" or a trailing "%" stays outside the match.
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,]\d)|(?<![\w.,])\d+(?:\.\d+)?(?![\w]|[.,]\d)")
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
OPERAND = re.compile(r"\d+(?:\.\d+)?")
# Small counts ("the 3 friends") are left alone: changing them tends to contradict the rest of the text.
MIN_CHANGED = 5
# Words that make a small number a constant of the solution rather than an input: "half" divides by
# 2, "three" is a 3 the question spells out. A question number equal to one of these is ambiguous.
CONSTANT_WORDS: Mapping[int, tuple[str, ...]] = {
    2: ("two", "half", "twice", "double", "pair", "both", "couple"), 3: ("three", "third", "triple", "thrice"),
    4: ("four", "quarter", "fourth"), 5: ("five", "fifth"), 6: ("six", "sixth"), 7: ("seven", "week"),
    8: ("eight",), 9: ("nine",), 10: ("ten", "tenth"), 11: ("eleven",), 12: ("twelve", "dozen", "month", "year"),
    24: ("day",), 30: ("month",), 52: ("week", "year"), 60: ("hour", "minute"), 100: ("percent", "%", "cent"),
    365: ("year",), 1000: ("thousand", "kilo"),
}
CONSTANTS_IN_WORDS = frozenset(Fraction(v) for v in CONSTANT_WORDS)
MAX_ATTEMPTS = 64

_BINARY: Mapping[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}


@dataclass(frozen=True, slots=True)
class NumberVariant:
    """A problem with new numbers: the question, a worked solution (the re-run arithmetic) and its answer."""

    question: str
    solution: str
    answer: str
    changed: Mapping[str, str]  # original number as written -> new number as written


@dataclass(frozen=True, slots=True)
class _Step:
    expression: str
    result: Fraction


class Untraceable(ValueError):
    """The solution's arithmetic cannot be re-run with new numbers (see the module docstring)."""


def exact_value(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers, ``+ - * /`` and parentheses."""
    try:
        tree = ast.parse(expression.replace(",", "").strip(), mode="eval")
    except SyntaxError as exc:
        raise Untraceable(f"not arithmetic: {expression!r}") from exc

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise Untraceable(f"division by zero in {expression!r}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        raise Untraceable(f"unsupported arithmetic in {expression!r}")

    return walk(tree)


def parse_steps(solution: str) -> list[_Step]:
    """The solution's annotations, each checked to evaluate to its stated result."""
    steps = []
    for expression, stated in ANNOTATION.findall(solution):
        try:
            result = exact_value(stated.strip())
        except (ValueError, ZeroDivisionError) as exc:
            raise Untraceable(f"annotation result {stated!r} is not a number") from exc
        if evaluate(expression) != result:
            raise Untraceable(f"annotation {expression}={stated} does not hold")
        steps.append(_Step(expression.strip(), result))
    if not steps:
        raise Untraceable("no calculator annotations")
    return steps


def format_like(value: Fraction, original: str) -> str:
    """``value`` written the way ``original`` is: thousands separators and decimal places kept."""
    decimals = len(original.partition(".")[2])
    if value.denominator != 1 and decimals == 0:
        decimals = 2
    return f"{float(value):,.{decimals}f}" if "," in original else f"{float(value):.{decimals}f}"


def format_result(value: Fraction) -> str:
    """A step's result as GSM8K writes it: an integer, or a decimal without trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def new_value(original: str, rng: random.Random) -> Fraction:
    """A plausible replacement for a question number: same kind (integer, money), similar size, other value."""
    value = exact_value(original)
    decimals = len(original.partition(".")[2])
    if decimals:
        step = Fraction(1, 4) if value * 4 == int(value * 4) else Fraction(1, 10 ** min(decimals, 2))
        candidate = round(value * Fraction(rng.choice((5, 6, 7, 8, 9, 11, 12, 13, 15)), 10) / step) * step
        return max(step, Fraction(candidate))
    if value <= 12:
        return Fraction(max(2, int(value) + rng.choice((-2, -1, 1, 2, 3))))
    # Round as coarsely as the original is round, yet fine enough to leave several choices.
    grain = next(g for g in (1000, 100, 50, 10, 5, 1) if value % g == 0 and value >= 4 * g)
    factor = Fraction(rng.choice((5, 6, 7, 8, 9, 11, 12, 13, 14, 15)), 10)
    return Fraction(max(grain, round(value * factor / grain) * grain))


def vary(question: str, solution: str, answer: str, rng: random.Random) -> NumberVariant:
    """``question`` with new numbers and its re-computed solution; raises ``Untraceable`` when it cannot.

    ``solution`` is GSM8K's raw answer (with annotations), ``answer`` the data set's short answer.
    """
    if re.search(r"\d:\d", question):
        raise Untraceable("clock times are not varied")
    steps = parse_steps(solution)
    if steps[-1].result != exact_value(answer):
        raise Untraceable("the last annotation is not the answer")
    mentions = [(m.group(), exact_value(m.group())) for m in NUMBER.finditer(question)]
    mention_counts = Counter(value for _, value in mentions)
    operand_counts = Counter(exact_value(operand) for step in steps for operand in OPERAND.findall(step.expression))
    seen_results: set[Fraction] = set()
    used: set[Fraction] = set()
    for step in steps:
        for operand in OPERAND.findall(step.expression):
            value = exact_value(operand)
            if value in seen_results:
                continue
            if value in mention_counts:
                used.add(value)
            elif not _justified_constant(value, question):
                raise Untraceable(f"operand {operand} in {step.expression!r} is neither an input, a result "
                                  "nor a constant the question names")
        seen_results.add(step.result)
    texts = {value: text for text, value in mentions}
    changeable = {
        value for value in used
        if value >= MIN_CHANGED and mention_counts[value] == 1 and value not in seen_results
        and not (value in CONSTANTS_IN_WORDS and (operand_counts[value] > 1 or _spelled_out(value, question)))
    }
    if not changeable:
        raise Untraceable("no question number can be changed unambiguously")
    for _ in range(MAX_ATTEMPTS):
        replacements = {value: new_value(texts[value], rng) for value in changeable}
        if any(new == old for old, new in replacements.items()):
            continue
        rerun = _rerun(steps, replacements, lambda value: value in mention_counts or _justified_constant(value, question))
        if rerun is not None:
            return _render(question, texts, replacements, rerun)
    raise Untraceable(f"no new numbers gave a whole positive answer in {MAX_ATTEMPTS} draws")


def _justified_constant(value: Fraction, question: str) -> bool:
    """0 and 1, or a constant the question names ("half" for 2 and 0.5, "%" for 100 and 0.1, ...)."""
    if value in (0, 1):
        return True
    if value.denominator != 1:
        return ("%" in question or "percent" in question.lower()
                or (value in (Fraction(1, 2), Fraction(3, 2)) and _mentions(question, ("half",)))
                or (value in (Fraction(1, 4), Fraction(3, 4)) and _mentions(question, ("quarter",))))
    return _spelled_out(value, question)


def _spelled_out(value: Fraction, question: str) -> bool:
    return value.denominator == 1 and _mentions(question, CONSTANT_WORDS.get(int(value), ()))


def _mentions(question: str, words: tuple[str, ...]) -> bool:
    lowered = question.lower()
    return any(re.search(rf"\b{re.escape(word)}", lowered) if word.isalpha() else word in lowered for word in words)


def _rerun(steps: list[_Step], replacements: Mapping[Fraction, Fraction],
           fixed: Callable[[Fraction], bool]) -> list[tuple[str, Fraction]] | None:
    """The steps recomputed with new inputs, or None when a step stops being a plain number.

    ``fixed(value)``: whether an operand of that value could also be an unchanged number (a kept
    input or a named constant); if such an operand is also an earlier result whose value changes
    ("12 / 3 = 4" then "4 * 4" with "four times"), which one is meant is unknown: None.
    """
    renamed: dict[Fraction, Fraction] = {}  # original result -> recomputed result
    rerun = []
    ambiguous = False
    for step in steps:
        def substitute(match: re.Match[str]) -> str:
            nonlocal ambiguous
            value = exact_value(match.group())
            if value in renamed:
                ambiguous = ambiguous or (renamed[value] != value and fixed(value))
                return format_result(renamed[value])
            if value in replacements:
                return format_result(replacements[value])
            return match.group()

        expression = OPERAND.sub(substitute, step.expression)
        result = evaluate(expression)
        # A whole count that turns fractional ("8 / 4 = 2 trips" -> "6 / 4 = 1.5 trips") makes no sense.
        fractional = result.denominator != 1 and step.result.denominator == 1
        if ambiguous or fractional or result < 0 or (result * 100).denominator != 1:
            return None
        renamed[step.result] = result
        rerun.append((expression, result))
    final = rerun[-1][1]
    return rerun if final > 0 and final.denominator == 1 else None


def _render(question: str, texts: Mapping[Fraction, str], replacements: Mapping[Fraction, Fraction],
            rerun: list[tuple[str, Fraction]]) -> NumberVariant:
    written = {texts[old]: format_like(new, texts[old]) for old, new in replacements.items()}

    def substitute(match: re.Match[str]) -> str:
        return written.get(match.group(), match.group())

    new_question = NUMBER.sub(substitute, question)
    answer = format_result(rerun[-1][1])
    lines = [f"{expression} = {format_result(result)}" for expression, result in rerun]
    return NumberVariant(question=new_question, solution="\n".join([*lines, f"The answer is {answer}."]),
                         answer=answer, changed=written)
