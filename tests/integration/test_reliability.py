"""Reliability proofs on the real things: the Tansu broker, PostgreSQL, workers in child processes.

One per-stage topology (a worker process per stage, the production shape) serves most tests: each
kills, stops or floods one part of it while requests arrive at a steady rate, then checks that
every request ended with exactly one outcome and one history row. The PostgreSQL outage test runs
its own worker behind a TCP proxy that the test cuts and restores. Generation is the echo backend
(with a simulated latency), so what is tested is the pipeline, not a model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from echolm.history.store import SqlHistoryStore
from echolm.settings import Settings, TierSettings, TopicSettings
from streams.broker import EmbeddedBroker, free_port
from streams.kafka_io import RequestProducer, ResponseCollector, create_topics
from streams.records import DeadLetterRecord, Message, RequestRecord, ResponseRecord
from streams.worker import WorkerProcess

pytestmark = pytest.mark.integration

MAX_PROMPT_CHARS = 2_000
LARGE_CONCURRENCY = 4
TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True),
    # Slow enough that a worker killed or stopped mid-batch has generations in flight.
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False,
                 simulated_latency_s=0.2, concurrency=LARGE_CONCURRENCY, timeout_s=10.0),
]
# name -> (stage, tiers) of one `echolm worker` process of the per-stage topology.
STAGE_WORKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "embed": ("embed", ()), "retrieve": ("retrieve", ()), "route": ("route", ()),
    "generate-small": ("generate", ("small",)), "generate-large": ("generate", ("large",)), "log": ("log", ()),
}
READY_TIMEOUT_S = 240.0
BATCH_TIMEOUT_S = 120.0
HISTORY_TIMEOUT_S = 60.0
SIGTERM_GRACE_S = 30.0


def pipeline_settings(data_dir: Path, bootstrap: str, database_url: str, **overrides: object) -> Settings:
    prefix = f"r{uuid.uuid4().hex[:8]}"
    values: dict[str, object] = dict(
        data_dir=data_dir, kafka_bootstrap=bootstrap, database_url=database_url,
        topics=TopicSettings(prefix=prefix, partitions=2), consumer_group=prefix, tiers=TIERS,
        admit_from_tiers=["large"], router_policy="always-large", stage_batch_size=4,
        max_prompt_chars=MAX_PROMPT_CHARS, embedder_threads=1, log_level="WARNING",
    )
    values.update(overrides)
    return Settings(**values)


def request(tenant: str, i: int, prefix: str = "task") -> RequestRecord:
    return RequestRecord(request_id=f"{tenant}-{prefix}-{i}", tenant=tenant,
                         messages=[Message(role="user", content=f"Task {i}: add {i} and {2 * i}, then double it.")],
                         max_tokens=16)


# ----------------------------------------------------------------------------- driving the pipeline


@dataclass
class Outcomes:
    """Every record seen on the responses topic for the requests a test sent, by request id."""

    expected: set[str]
    records: dict[str, list[ResponseRecord]] = field(default_factory=dict)
    dead_letters: dict[str, DeadLetterRecord] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        """Seconds from sending each request to its first response, as the client sees them."""
        return [self.answered_at[k] - self.sent_at[k] for k in self.answered_at if k in self.sent_at]

    @property
    def answered(self) -> int:
        return len(self.records)

    @property
    def duplicates(self) -> int:
        """Redelivered copies: at-least-once delivery allows them; clients de-duplicate by request id."""
        return sum(len(r) - 1 for r in self.records.values())

    def missing(self) -> set[str]:
        return self.expected - set(self.records)


Progress = Callable[[Outcomes], Awaitable[None]]


async def drive(settings: Settings, messages: Sequence[tuple[str, bytes]], *, rate: float,
                on_progress: Progress | None = None, timeout_s: float = BATCH_TIMEOUT_S,
                dead_letters_for: set[str] = frozenset()) -> Outcomes:  # type: ignore[assignment]
    """Sends ``(key, value)`` messages to the requests topic at ``rate`` per second and collects the
    responses keyed by them until each has one (or ``timeout_s`` passes), then the dead-letter
    records of ``dead_letters_for``."""
    await create_topics(settings)
    outcomes = Outcomes(expected={key for key, _ in messages})
    async with ResponseCollector(settings) as collector, \
            ResponseCollector(settings, settings.topics.dead_letter) as letters, \
            RequestProducer(settings) as producer:

        async def produce() -> None:
            started = time.monotonic()
            for i, (key, value) in enumerate(messages):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                outcomes.sent_at[key] = time.monotonic()
                await (await producer.send_raw(key.encode(), value))

        sender = asyncio.create_task(produce())
        deadline = time.monotonic() + timeout_s
        try:
            async for batch in collector.batches(timeout_s=0.25):
                for item in batch:
                    if isinstance(item, ResponseRecord) and item.request_id in outcomes.expected:
                        outcomes.records.setdefault(item.request_id, []).append(item)
                        outcomes.answered_at.setdefault(item.request_id, time.monotonic())
                if on_progress is not None:
                    await on_progress(outcomes)
                if not outcomes.missing() or time.monotonic() > deadline:
                    break
            await asyncio.wait_for(sender, timeout=5)
        finally:
            sender.cancel()
        if dead_letters_for:
            await _collect_dead_letters(letters, set(dead_letters_for), outcomes.dead_letters, deadline)
    return outcomes


async def _collect_dead_letters(letters: ResponseCollector, expected: set[str],
                                into: dict[str, DeadLetterRecord], deadline: float) -> None:
    async for batch in letters.batches(timeout_s=0.25):
        for raw in batch:
            letter = DeadLetterRecord.model_validate_json(raw if isinstance(raw, bytes) else raw.model_dump_json())
            if letter.request_id in expected:
                into[letter.request_id] = letter
        if set(into) >= expected or time.monotonic() > deadline:
            return


def encoded(requests: Sequence[RequestRecord]) -> list[tuple[str, bytes]]:
    return [(r.request_id, r.model_dump_json().encode()) for r in requests]


async def history_of(database_url: str, request_ids: Sequence[str], tenant: str,
                     timeout_s: float = HISTORY_TIMEOUT_S) -> tuple[list, int]:
    """Waits until the log stage has written every request; returns (rows, active examples of tenant)."""
    store = SqlHistoryStore(database_url)
    await store.start()
    try:
        deadline = time.monotonic() + timeout_s
        while len(await store.logged_request_ids(request_ids)) < len(request_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        return await store.responses_for(request_ids), await store.count_examples(tenant)
    finally:
        await store.aclose()


def assert_one_outcome_each(outcomes: Outcomes, workers: dict[str, WorkerProcess]) -> None:
    """Nothing lost; redelivered copies agree with the first, so a client keeping one is right."""
    missing = outcomes.missing()
    assert not missing, (f"{len(missing)} request(s) never answered, e.g. {sorted(missing)[:3]}\n"
                         + "\n".join(f"--- {n}\n{w.tail(15)}" for n, w in workers.items()))
    for request_id, copies in outcomes.records.items():
        first = copies[0]
        assert first.ok, f"{request_id} failed: {first.error}"
        assert all(c.ok and c.text == first.text and c.tier == first.tier for c in copies), request_id


def assert_history_once(rows: list, examples: int, request_ids: Sequence[str]) -> None:
    assert sorted(row.request_id for row in rows) == sorted(request_ids)  # each request exactly once
    assert all(row.error_code is None and row.tier == "large" for row in rows)
    # Each large-tier answer is admitted once, however often its response record was redelivered.
    assert examples == len(request_ids)


# ----------------------------------------------------------------------------- the per-stage topology


@dataclass
class Topology:
    settings: Settings
    workers: dict[str, WorkerProcess]
    metrics_ports: dict[str, int]

    def restart(self, name: str) -> None:
        worker = self.workers[name]
        if worker.process is not None and worker.process.poll() is None:
            raise AssertionError(f"worker {name} is still running")
        worker.start()

    def check_alive(self) -> None:
        dead = {n: w.tail(30) for n, w in self.workers.items() if not w.alive}
        assert not dead, "workers died:\n" + "\n".join(f"--- {n}\n{t}" for n, t in dead.items())


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, broker: EmbeddedBroker, postgres_url: str):
    """One `echolm worker` process per stage (generate: one per tier), each with its own metrics port."""
    data_dir = tmp_path_factory.mktemp("topology")
    settings = pipeline_settings(data_dir / "state", broker.bootstrap, postgres_url, log_format="json")
    ports = {name: free_port() for name in STAGE_WORKERS}
    workers = {
        name: WorkerProcess(settings.model_copy(update={"metrics_port": ports[name]}), stage=stage, tiers=tiers,
                            log_path=data_dir / f"worker-{name}.log")
        for name, (stage, tiers) in STAGE_WORKERS.items()
    }
    for worker in workers.values():
        worker.start()
    running = Topology(settings, workers, ports)
    try:
        # Ready means a request went through every stage (groups joined, models loaded).
        warm = [request("warm", i) for i in range(2)]
        outcomes = asyncio.run(drive(settings, encoded(warm), rate=10, timeout_s=READY_TIMEOUT_S))
        assert_one_outcome_each(outcomes, workers)
        yield running
    finally:
        for worker in workers.values():
            worker.stop()


def _fault_at_a_third(n: int, fault: Callable[[], Awaitable[None]]) -> tuple[Progress, threading.Event]:
    done = threading.Event()

    async def on_progress(outcomes: Outcomes) -> None:
        if not done.is_set() and outcomes.answered >= n // 3:
            done.set()
            await fault()

    return on_progress, done


@pytest.mark.parametrize("victim", ["embed", "retrieve", "route", "generate-large", "log"])
def test_kill_9_of_any_stage_worker_loses_and_duplicates_nothing(topology: Topology, victim: str) -> None:
    topology.check_alive()
    tenant = f"kill-{victim}"
    n = 48
    requests = [request(tenant, i) for i in range(n)]
    worker = topology.workers[victim]
    killed_with: list[int] = []

    async def kill_and_restart() -> None:
        assert worker.process is not None
        os.kill(worker.process.pid, signal.SIGKILL)
        killed_with.append(await asyncio.to_thread(worker.process.wait, 10))
        topology.restart(victim)  # a fresh worker takes the partitions over; redelivery does the rest

    on_progress, faulted = _fault_at_a_third(n, kill_and_restart)
    # Requests keep arriving during the kill, so every stage has work before, during and after it.
    outcomes = asyncio.run(drive(topology.settings, encoded(requests), rate=8, on_progress=on_progress))
    assert faulted.is_set() and killed_with == [-signal.SIGKILL]
    assert_one_outcome_each(outcomes, topology.workers)
    rows, examples = asyncio.run(history_of(topology.settings.resolved_database_url,
                                            [r.request_id for r in requests], tenant))
    assert_history_once(rows, examples, [r.request_id for r in requests])
    topology.check_alive()
    print(f"kill -9 {victim}: {outcomes.duplicates} redelivered duplicate(s) de-duplicated by request id")


def test_sigterm_mid_batch_exits_cleanly_and_a_restarted_worker_finishes(topology: Topology) -> None:
    topology.check_alive()
    tenant = "sigterm"
    n = 48
    requests = [request(tenant, i) for i in range(n)]
    worker = topology.workers["generate-large"]  # the stage with generations in flight
    exits: list[tuple[int, float]] = []
    in_flight_at_stop: list[float] = []

    async def stop_and_restart() -> None:
        assert worker.process is not None
        deadline = time.monotonic() + 5
        while not in_flight_at_stop or (in_flight_at_stop[-1] < 1 and time.monotonic() < deadline):
            in_flight_at_stop.append(await asyncio.to_thread(
                _metric, topology, "generate-large", "echolm_tier_in_flight", tier="large"))
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.process.wait, SIGTERM_GRACE_S)
        exits.append((code, time.monotonic() - started))
        topology.restart("generate-large")

    on_progress, stopped = _fault_at_a_third(n, stop_and_restart)
    outcomes = asyncio.run(drive(topology.settings, encoded(requests), rate=8, on_progress=on_progress))
    assert stopped.is_set()
    (code, took), = exits
    assert code == 0, f"SIGTERM exit code {code}:\n{worker.tail(30)}"
    assert took < SIGTERM_GRACE_S
    assert_one_outcome_each(outcomes, topology.workers)
    rows, examples = asyncio.run(history_of(topology.settings.resolved_database_url,
                                            [r.request_id for r in requests], tenant))
    assert_history_once(rows, examples, [r.request_id for r in requests])
    assert in_flight_at_stop[-1] >= 1  # stopped mid-generation: the case faust acked and lost
    print(f"SIGTERM: exit 0 after {took:.1f}s with {in_flight_at_stop[-1]:.0f} generation(s) in flight; "
          f"{outcomes.duplicates} redelivered duplicate(s)")


# ----------------------------------------------------------------------------- bad input (hypothesis)

VALID_ROLES = ("system", "user", "assistant")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")


@dataclass(frozen=True)
class BadInput:
    """A payload the pipeline must refuse, with the error code and a phrase its message must contain."""

    kind: str
    code: str
    phrase: str
    document: dict | None = None  # JSON documents get the Kafka key as request_id (unless missing)
    raw: bytes | None = None

    def encode(self, key: str) -> bytes:
        if self.raw is not None:
            return self.raw
        document = dict(self.document or {})
        if "request_id" in document:
            document["request_id"] = key
        return json.dumps(document).encode()


def _user(content: str = "What is two plus two?") -> list[dict]:
    return [{"role": "user", "content": content}]


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def bad_inputs() -> dict[str, st.SearchStrategy[BadInput]]:
    """One strategy per kind of bad input a producer can put on the requests topic."""
    invalid = "invalid_request"
    return {
        "not-json": st.text(min_size=1, max_size=80).filter(_not_json).map(
            lambda t: BadInput("not-json", invalid, "invalid json", raw=t.encode())),
        "json-not-an-object": st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=20),
                                        st.none(), st.booleans()).map(
            lambda v: BadInput("json-not-an-object", invalid, "should be an object", raw=json.dumps(v).encode())),
        "invalid-utf8": st.tuples(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]),
                                  st.binary(max_size=8)).map(
            lambda p: BadInput("invalid-utf8", invalid, "invalid json", raw=(
                b'{"request_id": "x", "messages": [{"role": "user", "content": "' + p[0] + p[1].replace(b'"', b"")
                + b'"}]}'))),
        "wrong-types": st.one_of(
            st.builds(lambda v: ("messages", {"request_id": "", "messages": v}),
                      st.one_of(st.integers(), st.text(max_size=10), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                     max_size=2))),
            st.builds(lambda v: ("max_tokens", {"request_id": "", "messages": _user(), "max_tokens": v}),
                      st.one_of(st.text(alphabet="abc", min_size=1, max_size=5), st.integers(max_value=0))),
            st.builds(lambda v: ("temperature", {"request_id": "", "messages": _user(), "temperature": v}),
                      st.floats(min_value=2.01, max_value=1e6)),
            st.builds(lambda v: ("content", {"request_id": "", "messages": [{"role": "user", "content": v}]}),
                      st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.none())),
        ).map(lambda fd: BadInput("wrong-types", invalid, fd[0], document=fd[1])),
        "missing-field": st.sampled_from(["request_id", "messages"]).map(
            lambda f: BadInput("missing-field", invalid, f"{f}: field required",
                               document={k: v for k, v in {"request_id": "", "messages": _user()}.items() if k != f})),
        "huge-prompt": st.integers(min_value=MAX_PROMPT_CHARS + 1, max_value=MAX_PROMPT_CHARS * 20).map(
            lambda n: BadInput("huge-prompt", "prompt_too_long", f"the limit is {MAX_PROMPT_CHARS}",
                               document={"request_id": "", "messages": _user("x" * n)})),
        "unknown-role": st.text(min_size=0, max_size=12).filter(lambda r: r not in VALID_ROLES).map(
            lambda r: BadInput("unknown-role", invalid, "role",
                               document={"request_id": "", "messages": [{"role": r, "content": "hi"}, *_user()]})),
        "bad-tenant": st.one_of(st.text(min_size=1, max_size=30).filter(lambda t: not TENANT_PATTERN.match(t)),
                                st.just(""), st.text(alphabet="abc", min_size=101, max_size=120)).map(
            lambda t: BadInput("bad-tenant", invalid, "tenant",
                               document={"request_id": "", "tenant": t, "messages": _user()})),
        "no-user-turn": st.lists(st.sampled_from(["system", "assistant"]), min_size=1, max_size=3).map(
            lambda roles: BadInput("no-user-turn", invalid, "non-empty user message",
                                   document={"request_id": "", "messages": [{"role": r, "content": "hi"} for r in roles]
                                             + [{"role": "user", "content": "   "}]})),
    }


def draw(strategy: st.SearchStrategy[BadInput], n: int) -> list[BadInput]:
    """``n`` distinct examples of a strategy, reproducibly, for one pipeline run (not one per example)."""
    drawn: list[BadInput] = []

    @hypothesis_settings(max_examples=n * 4, derandomize=True, database=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck), deadline=None)
    @given(strategy)
    def collect(example: BadInput) -> None:
        if example not in drawn and len(drawn) < n:
            drawn.append(example)

    collect()
    return drawn


def test_generated_bad_inputs_get_clear_errors_and_the_pipeline_keeps_answering(topology: Topology) -> None:
    topology.check_alive()
    bad = [example for strategy in bad_inputs().values() for example in draw(strategy, 5)]
    assert len(bad) >= 40 and len({b.kind for b in bad}) == len(bad_inputs())
    messages = [(f"bad-{i}-{example.kind}", example.encode(f"bad-{i}-{example.kind}")) for i, example in enumerate(bad)]
    after = [request("after-bad", i) for i in range(5)]  # valid requests behind all of them
    outcomes = asyncio.run(drive(topology.settings, messages + encoded(after), rate=40,
                                 dead_letters_for={key for key, _ in messages}))
    letters = outcomes.dead_letters
    assert not outcomes.missing(), sorted(outcomes.missing())[:5]
    for (key, _), example in zip(messages, bad, strict=True):
        response = outcomes.records[key][0]
        assert response.error is not None, f"{example} was answered: {response.text!r}"
        assert response.error.code.value == example.code, (example, response.error)
        assert example.phrase in response.error.message.lower(), (example.kind, response.error.message)
        assert letters[key].code.value == example.code  # operators see every one on the dead-letter topic
    for r in after:
        assert outcomes.records[r.request_id][0].ok, outcomes.records[r.request_id][0].error
    undecodable = [k for (k, _), e in zip(messages, bad, strict=True) if e.raw is not None]
    assert all(letters[k].raw_b64 and base64.b64decode(letters[k].raw_b64) == dict(messages)[k]
               for k in undecodable)


def test_worker_logs_are_json_lines_that_name_the_request(topology: Topology) -> None:
    """ECHOLM_LOG_FORMAT=json: every line any worker wrote (through kills and restarts) is one JSON object."""
    for name, worker in topology.workers.items():
        for number, line in enumerate(worker.log_path.read_text(errors="replace").splitlines(), start=1):
            try:
                document = json.loads(line)
            except ValueError:
                pytest.fail(f"worker {name} log line {number} is not JSON: {line[:200]!r}")
            assert {"ts", "level", "logger", "message"} <= document.keys(), document
    embed_log = [json.loads(line) for line in topology.workers["embed"].log_path.read_text().splitlines()]
    rejected = {d["request_id"] for d in embed_log
                if d["level"] == "WARNING" and d.get("stage") == "embed" and str(d.get("request_id")).startswith("bad-")}
    # The bad-input test's undecodable payloads (all kinds but huge prompts, which decode) are named.
    assert len(rejected) >= 30 and not any(key.endswith("huge-prompt") for key in rejected), sorted(rejected)[:5]


# ----------------------------------------------------------------------------- metrics


def _scrape(topology: Topology, worker: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{topology.metrics_ports[worker]}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _metric(topology: Topology, worker: str, name: str, **labels: str) -> float:
    return _scrape(topology, worker).get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_worker_serves_prometheus_metrics(topology: Topology) -> None:
    topology.check_alive()
    n = 20
    requests = [request("metrics", i) for i in range(n)]
    before = {name: _scrape(topology, name) for name in STAGE_WORKERS}
    in_flight: list[float] = []

    async def sample(_: Outcomes) -> None:
        in_flight.append(await asyncio.to_thread(_metric, topology, "generate-large", "echolm_tier_in_flight",
                                                 tier="large"))

    outcomes = asyncio.run(drive(topology.settings, encoded(requests), rate=10, on_progress=sample))
    assert_one_outcome_each(outcomes, topology.workers)
    asyncio.run(history_of(topology.settings.resolved_database_url, [r.request_id for r in requests], "metrics"))
    after = {name: _scrape(topology, name) for name in STAGE_WORKERS}

    def delta(worker: str, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[worker].get(key, 0.0) - before[worker].get(key, 0.0)

    for worker, stage in [("embed", "embed"), ("retrieve", "retrieve"), ("route", "route"),
                          ("generate-large", "generate.large"), ("log", "log")]:
        assert delta(worker, "echolm_stage_events_total", stage=stage) >= n, worker
        assert delta(worker, "echolm_stage_batch_seconds_count", stage=stage) >= 1, worker
    assert delta("route", "echolm_routed_total", tier="large") == n  # router policy always-large
    assert delta("route", "echolm_examples_per_request_count") == n
    # The tenant's earlier answers are examples by now, so later requests retrieve some.
    assert delta("route", "echolm_examples_per_request_sum") > 0
    assert after["retrieve"][("echolm_example_cache_size", ())] > 0
    assert 1 <= max(in_flight) <= LARGE_CONCURRENCY, in_flight
    assert after["generate-large"][("echolm_tier_in_flight", (("tier", "large"),))] == 0
    for worker in STAGE_WORKERS:  # valid requests: no stage counted an error
        errors = {k: v for k, v in after[worker].items() if k[0] == "echolm_stage_errors_total"}
        assert all(v == before[worker].get(k, 0.0) for k, v in errors.items()), (worker, errors)


# ----------------------------------------------------------------------------- PostgreSQL outage


class CuttableProxy:
    """A TCP proxy on a free loopback port, in its own thread, that can be cut and restored.

    ``cut()`` closes every open connection and stops listening (new connections are refused);
    ``restore()`` listens again on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> CuttableProxy:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coroutine: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)  # type: ignore[arg-type]

    def restore(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)

        self._call(listen())

    def cut(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(close())

    async def _pipe(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.wait_for(asyncio.open_connection(*self._target), 5)
        except (OSError, TimeoutError):
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}

        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()
                self._writers.discard(writer)

        await asyncio.gather(copy(client_reader, server_writer), copy(server_reader, client_writer))


RETRY_LINE = re.compile(r"history unavailable .*; retrying (?:record responses|admit examples) in ([0-9.]+)s")


def test_postgres_outage_stalls_the_log_stage_which_retries_and_catches_up(
        tmp_path: Path, broker: EmbeddedBroker, empty_postgres_url: str) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(empty_postgres_url)
    with CuttableProxy(real.host or "127.0.0.1", real.port or 5432) as proxy:
        through_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = pipeline_settings(tmp_path / "state", broker.bootstrap, through_proxy)
        worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")  # all stages, one process
        worker.start()
        try:
            warm = asyncio.run(drive(settings, encoded([request("pg-warm", 0)]), rate=1, timeout_s=READY_TIMEOUT_S))
            assert_one_outcome_each(warm, {"all": worker})
            tenant, n, outage_s = "pg-outage", 40, 8.0
            requests = [request(tenant, i) for i in range(n)]
            outage: list[float] = []

            async def cut_for_a_while() -> None:
                proxy.cut()
                outage.append(time.monotonic())
                await asyncio.sleep(outage_s)  # requests keep arriving and being answered meanwhile
                proxy.restore()
                outage.append(time.monotonic())

            async def scenario() -> Outcomes:
                cutting: list[asyncio.Task[None]] = []

                async def at_a_quarter(outcomes: Outcomes) -> None:
                    if not cutting and outcomes.answered >= n // 4:  # in the background: keep collecting
                        cutting.append(asyncio.create_task(cut_for_a_while()))

                outcomes = await drive(settings, encoded(requests), rate=5, on_progress=at_a_quarter)
                await asyncio.gather(*cutting)
                return outcomes

            outcomes = asyncio.run(scenario())
            assert len(outage) == 2
            answered_in_outage = [t for t in outcomes.answered_at.values() if outage[0] < t < outage[1]]
            assert len(answered_in_outage) >= n // 4
            # Answers do not need the database: the batch completed while it was away, and on time.
            assert_one_outcome_each(outcomes, {"all": worker})
            latencies = sorted(outcomes.latencies())
            # Five Kafka hops and a 0.2 s generation. With faust's fixed 1.5 s fetch wait, Tansu made
            # each hop of an all-stage worker wait ~0.75 s (3-4 s in all); ECHOLM_FETCH_MAX_WAIT_MS bounds it.
            assert statistics.median(latencies) < 1.5, latencies
            rows, examples = asyncio.run(history_of(empty_postgres_url, [r.request_id for r in requests], tenant))
            assert_history_once(rows, examples, [r.request_id for r in requests])
            assert worker.alive, worker.tail(30)
        finally:
            worker.stop()
    delays = [float(d) for d in RETRY_LINE.findall(worker.log_path.read_text(errors="replace"))]
    assert len(delays) >= 3, worker.tail(40)
    assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0], delays  # exponential backoff
    print(f"PostgreSQL cut for {outage[1] - outage[0]:.1f}s: {len(delays)} retries with delays {delays}; "
          f"{len(answered_in_outage)} requests answered meanwhile; answer latency median "
          f"{statistics.median(latencies):.2f}s, max {latencies[-1]:.2f}s")
