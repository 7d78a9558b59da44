"""The stage handlers with the shipped test doubles: no broker, no database, no model."""

from __future__ import annotations

import dataclasses

import pytest

from echolm.domain import ErrorCode
from echolm.generation.echo import EchoGenerator
from echolm.protocols import ExampleCandidate
from echolm.retrieval.example_cache import ExampleCache
from echolm.routing.similarity import SimilarityRouter
from echolm.settings import Settings, TierSettings
from echolm.testing import HashingEmbedder, InMemoryHistoryStore, StaticRouter
from streams.records import DeadLetterRecord, ExampleRef, InFlightRequest, Message, RequestRecord, ResponseRecord, RouteInfo
from streams.stages import EmbedStage, GenerateStage, LogStage, RetrieveStage, RouteStage, accept_all

TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False),
]
SETTINGS = Settings(tiers=TIERS, max_prompt_chars=200, offload_min_similarity=0.8, kafka_bootstrap="unused:1")


def request(request_id: str, text: str, tenant: str = "default") -> RequestRecord:
    return RequestRecord(request_id=request_id, tenant=tenant, messages=[Message(role="user", content=text)])


def decode(outgoing, record_type):
    return [record_type.model_validate_json(o.value) for o in outgoing]


async def embed(requests: list[RequestRecord]) -> list[InFlightRequest]:
    out = await EmbedStage(SETTINGS, HashingEmbedder(64)).process(requests)
    return decode([o for o in out if o.topic == SETTINGS.topics.embedded], InFlightRequest)


async def test_embed_refuses_oversized_prompts_and_embeds_the_rest():
    out = await EmbedStage(SETTINGS, HashingEmbedder(64)).process([request("ok", "short"), request("big", "x" * 201)])
    by_topic = {}
    for o in out:
        by_topic.setdefault(o.topic, []).append(o)
    [embedded] = decode(by_topic[SETTINGS.topics.embedded], InFlightRequest)
    assert embedded.request.request_id == "ok" and embedded.embedding().shape == (64,)
    assert "embed" in embedded.timings
    [error] = decode(by_topic[SETTINGS.topics.responses], ResponseRecord)
    assert error.error.code is ErrorCode.PROMPT_TOO_LONG and "201 characters" in error.error.message
    [letter] = decode(by_topic[SETTINGS.topics.dead_letter], DeadLetterRecord)
    assert letter.request_id == "big" and letter.stage == "embed"


async def test_retrieve_and_route_offload_only_with_close_examples_of_the_same_tenant():
    store = InMemoryHistoryStore()
    embedder = HashingEmbedder(64)
    prompt = "how do I reverse a list in python"
    await store.admit_examples([ExampleCandidate(
        tenant="acme", source_request_id="old", prompt=prompt, response="xs[::-1]", model="big", tier="large",
        embedding=embedder.embed([prompt])[0])])
    cache = ExampleCache(64)
    await cache.sync_from(store)

    records = await embed([request("same", prompt, "acme"), request("other", prompt, "globex"),
                           request("far", "the french revolution began in 1789", "acme")])
    retrieved = decode(await RetrieveStage(SETTINGS, cache).process(records), InFlightRequest)
    by_id = {r.request.request_id: r for r in retrieved}
    assert [e.response for e in by_id["same"].examples] == ["xs[::-1]"]
    assert by_id["other"].examples == []  # never across tenants

    routed = await RouteStage(SETTINGS, SimilarityRouter.from_settings(SETTINGS)).process(retrieved)
    topics = {decode([o], InFlightRequest)[0].request.request_id: o.topic for o in routed}
    assert topics == {"same": SETTINGS.topics.generate("small"), "other": SETTINGS.topics.generate("large"),
                      "far": SETTINGS.topics.generate("large")}


async def _routed(tier: str, use_examples: bool) -> InFlightRequest:
    [record] = await embed([request("r1", "what is two plus two")])
    ref = ExampleRef(id=7, similarity=0.93, prompt="what is 2+2", response="4", model="big")
    route = RouteInfo(tier=tier, score=0.93, reason="test", use_examples=use_examples)
    return record.model_copy(update={"examples": [ref], "route": route})


async def test_generate_prepends_examples_only_for_an_offloaded_tier_that_takes_them():
    small = GenerateStage(SETTINGS, TIERS[0], EchoGenerator("echo-small"))
    [offloaded] = decode(await small.process([await _routed("small", True)]), ResponseRecord)
    assert [e.id for e in offloaded.examples] == [7]
    assert offloaded.prompt_tokens > 20  # the hint block was in the prompt

    large = GenerateStage(SETTINGS, TIERS[1], EchoGenerator("echo-large"))
    [direct] = decode(await large.process([await _routed("large", True)]), ResponseRecord)
    assert direct.examples == [] and direct.prompt_tokens == 5  # "what is two plus two": no hints
    assert direct.ok and direct.tier == "large" and direct.embedding_b64


class SplitTimingGenerator(EchoGenerator):
    """An echo that reports a prefill/decode split, as the llama.cpp backend does."""

    async def generate(self, messages, params, *, request_id):
        result = await super().generate(messages, params, request_id=request_id)
        return dataclasses.replace(result, prefill_s=0.25, decode_s=0.5)


async def test_generate_logs_the_backends_prefill_decode_split_inside_its_timing():
    split = GenerateStage(SETTINGS, TIERS[1], SplitTimingGenerator("echo-large"))
    [answer] = decode(await split.process([await _routed("large", True)]), ResponseRecord)
    assert (answer.timings["generate.prefill"], answer.timings["generate.decode"]) == (0.25, 0.5)
    assert "generate" in answer.timings
    plain = GenerateStage(SETTINGS, TIERS[1], EchoGenerator("echo-large"))
    [answer] = decode(await plain.process([await _routed("large", True)]), ResponseRecord)
    assert "generate" in answer.timings and "generate.prefill" not in answer.timings


async def test_generation_errors_become_error_responses_and_dead_letters():
    slow = TIERS[1].model_copy(update={"timeout_s": 0.01})
    stage = GenerateStage(SETTINGS, slow, EchoGenerator("echo-large", delay_s=1.0, timeout_s=0.01))
    out = await stage.process([await _routed("large", False)])
    [response] = decode([o for o in out if o.topic == SETTINGS.topics.responses], ResponseRecord)
    [letter] = decode([o for o in out if o.topic == SETTINGS.topics.dead_letter], DeadLetterRecord)
    assert response.error.code is ErrorCode.GENERATION_TIMEOUT and response.tier == "large"
    assert letter.code is ErrorCode.GENERATION_TIMEOUT and letter.stage == "generate.large"


async def _answered(tier: str, request_id: str = "r1") -> ResponseRecord:
    generator = EchoGenerator(f"echo-{tier}")
    stage = GenerateStage(SETTINGS, SETTINGS.tier(tier), generator)
    record = (await _routed(tier, False)).model_copy(
        update={"request": request(request_id, "what is two plus two")})
    [response] = decode(await stage.process([record]), ResponseRecord)
    return response


async def test_log_admits_large_answers_through_the_hook_and_is_idempotent():
    store = InMemoryHistoryStore()
    large, small = await _answered("large", "a"), await _answered("small", "b")
    log = LogStage(SETTINGS, store, accept_all)
    await log.process([large, small, large])  # a redelivered duplicate inside the batch
    await log.process([large])  # and again later
    assert await store.count_responses() == 2
    assert await store.count_examples() == 1  # only the large tier's answer, once

    def scrub(candidate: ExampleCandidate) -> ExampleCandidate | None:
        if "secret" in candidate.prompt:
            return None
        return dataclasses.replace(candidate, response=candidate.response.replace("echo", "[scrubbed]"))

    scrubbed_store = InMemoryHistoryStore()
    await LogStage(SETTINGS, scrubbed_store, scrub).process([large])
    [event] = await scrubbed_store.cache_events_since(0)
    assert event.example.response.startswith("[scrubbed]")


class FlakyStore(InMemoryHistoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def record_responses(self, logs):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database is restarting")
        await super().record_responses(logs)


async def test_log_retries_until_the_store_is_back():
    store = FlakyStore(failures=3)
    await LogStage(SETTINGS, store, accept_all, max_backoff_s=0.01).process([await _answered("large")])
    assert store.failures == 0 and await store.count_responses() == 1


@pytest.mark.parametrize("tier", ["small", "large"])
async def test_static_router_double_routes_everything_to_its_tier(tier):
    [record] = await embed([request("r", "anything")])
    out = await RouteStage(SETTINGS, StaticRouter(tier)).process([record.model_copy(update={"examples": []})])
    assert out[0].topic == SETTINGS.topics.generate(tier)


async def test_a_repeat_above_the_reuse_bar_is_answered_verbatim_from_the_route_stage():
    reuse = SETTINGS.model_copy(update={"reuse_min_similarity": 0.98, "reuse_min_quality": 0.5})
    [record] = await embed([request("r1", "what is two plus two")])
    refs = {"repeat": ExampleRef(id=7, similarity=0.995, prompt="what is two plus two", response="4", model="big"),
            "close": ExampleRef(id=8, similarity=0.93, prompt="what is 2+2", response="4", model="big"),
            "poor": ExampleRef(id=9, similarity=0.999, prompt="what is two plus two", response="5", model="big",
                               quality=0.1)}
    records = [record.model_copy(update={"request": request(name, "what is two plus two"), "examples": [ref]})
               for name, ref in refs.items()]
    out = await RouteStage(reuse, StaticRouter("small")).process(records)
    by_id = {o.key: o for o in out}
    assert by_id["close"].topic == by_id["poor"].topic == SETTINGS.topics.generate("small")
    assert by_id["repeat"].topic == SETTINGS.topics.responses
    [answer] = decode([by_id["repeat"]], ResponseRecord)
    assert answer.ok and answer.text == "4" and answer.tier == "cache" and answer.model == "big"
    assert [e.id for e in answer.examples] == [7] and answer.completion_tokens == 0
    assert "verbatim reuse of example 7" in answer.route.reason and "route" in answer.timings
    # Off by default: the same repeat is routed to generation.
    [routed] = await RouteStage(SETTINGS, StaticRouter("small")).process(records[:1])
    assert routed.topic == SETTINGS.topics.generate("small")


async def test_a_reused_answer_is_logged_but_never_admitted_again_as_an_example():
    store = InMemoryHistoryStore()
    reuse = SETTINGS.model_copy(update={"reuse_min_similarity": 0.98})
    [record] = await embed([request("r1", "what is two plus two")])
    ref = ExampleRef(id=7, similarity=0.995, prompt="what is two plus two", response="4", model="big")
    [out] = await RouteStage(reuse, StaticRouter("small")).process([record.model_copy(update={"examples": [ref]})])
    await LogStage(reuse, store).process(decode([out], ResponseRecord))
    [logged] = await store.responses_for(["r1"])
    assert logged.tier == "cache" and logged.example_ids == [7] and logged.response == "4"
    assert await store.count_examples() == 0


async def test_first_example_affinity_sends_offloaded_requests_to_their_first_examples_partition():
    from echolm.affinity import affinity_partition

    affine = SETTINGS.model_copy(update={"generate_affinity": "first-example"})
    [record] = await embed([request("r", "what is two plus two")])
    refs = [ExampleRef(id=i, similarity=s, prompt="what is 2+2", response="4", model="big")
            for i, s in ((11, 0.8), (12, 0.9), (13, 0.9))]
    with_examples = [record.model_copy(update={"request": request(f"r{i}", "what is two plus two"),
                                               "examples": refs if i % 2 else refs[::-1]}) for i in range(4)]
    small = await RouteStage(affine, StaticRouter("small")).process(with_examples)
    # The prompt's first hint decides, whatever order retrieval listed them in: most similar, ties by id.
    assert [o.partition for o in small] == [affinity_partition([12], 4)] * 4
    assert affinity_partition([12], 4) != affinity_partition([13], 4)  # the tie-break matters here
    # The large tier takes no examples, so its requests keep the request id's partition; so does the default.
    large = await RouteStage(affine, StaticRouter("large")).process(with_examples)
    default = await RouteStage(SETTINGS, StaticRouter("small")).process(with_examples)
    assert {o.partition for o in large} == {o.partition for o in default} == {None}
    assert [o.key for o in small] == [f"r{i}" for i in range(4)]  # still keyed (and logged) by request id
