"""The route decision's context as it is logged: built at routing time, stored as JSON with the answer.

``describe_route`` gives every decision a ``RouteContext``: the router's own when it computed one (the
bandit router: mu_i, S_i, C_i, load, exploration, state version), else what any router sees (the
selected examples, their features, the sizes, the loads handed in). ``route_context_to_json`` /
``route_context_from_json`` map it to and from the history's ``responses.route_context`` column;
reading is lenient on purpose: a row written before the column existed, by a newer version, or
damaged by hand reads as "no logged context", and the learners then rebuild the context as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from echolm.domain import ROUTE_CONTEXT_VERSION, ExampleFeatures, RetrievedExample, RouteContext, RouteDecision, RoutedExample
from echolm.protocols import RoutingContext
from echolm.selection import hint_chars

log = logging.getLogger(__name__)

_ADAPTER: TypeAdapter[RouteContext] = TypeAdapter(RouteContext)


def routed_examples(examples: Sequence[RetrievedExample]) -> tuple[RoutedExample, ...]:
    return tuple(RoutedExample(int(e.example.id), float(e.similarity), e.helpfulness, e.example.quality)
                 for e in examples)


def describe_route(context: RoutingContext, decision: RouteDecision, policy: str) -> RouteContext:
    """The context logged with ``decision``: the router's own, or (routers that give none) the inputs
    every router sees, under the name of the configured ``policy``."""
    if decision.context is not None:
        return decision.context
    return RouteContext(
        policy=policy, tier=decision.tier, scores={t: float(v) for t, v in decision.scores.items()},
        loads={t: float(v) for t, v in context.load.items()},
        compare_with=decision.compare_with, prompt_chars=context.prompt_chars,
        example_chars=sum(hint_chars(e) for e in context.examples), examples=routed_examples(context.examples),
        features=ExampleFeatures.from_retrieved(context.examples),
    )


def route_context_to_json(context: RouteContext | None) -> dict[str, Any] | None:
    """Plain JSON types (numpy scalars would not serialise)."""
    if context is None:
        return None
    # numpy scalars (a router's arithmetic) become plain numbers instead of failing the write.
    return _ADAPTER.dump_python(context, mode="json", fallback=_plain, warnings=False)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def route_context_from_json(data: Mapping[str, Any] | None) -> RouteContext | None:
    """The stored context, or None when there is none that this version can read (see the module docstring)."""
    if data is None:
        return None
    if data.get("version") != ROUTE_CONTEXT_VERSION:
        return None
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        log.warning("ignoring an unreadable logged route context (%s)", exc.errors()[:1])
        return None

