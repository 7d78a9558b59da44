"""Kafka clients outside the faust app: topic admin, the request producer, the response collector."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from echolm.settings import Settings
from streams.records import RequestRecord, ResponseRecord

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


def pipeline_topics(settings: Settings) -> list[str]:
    topics = settings.topics
    names = [topics.requests, topics.embedded, topics.retrieved, topics.responses, topics.dead_letter,
             topics.feedback, topics.load]
    names += [topics.generate(t.name) for t in settings.tiers]
    return names


async def create_topics(settings: Settings, timeout_s: float = 30.0) -> dict[str, str]:
    """Create every pipeline topic; returns topic -> 'created' | 'exists'. Raises on other errors."""
    assert settings.kafka_bootstrap, "no broker configured"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id=settings.kafka_client_id,
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        new = [NewTopic(name, settings.topics.partitions, settings.topics.replication_factor)
               for name in pipeline_topics(settings)]
        response = await asyncio.wait_for(admin.create_topics(new), timeout_s)
        result: dict[str, str] = {}
        # Tansu answers "already exists" with error code 36 instead of raising.
        for topic_error in response.topic_errors:
            name, code = topic_error[0], topic_error[1]
            if code == 0:
                result[name] = "created"
            elif code == TOPIC_ALREADY_EXISTS:
                result[name] = "exists"
            else:
                raise RuntimeError(f"creating topic {name} failed with Kafka error code {code}: {topic_error}")
        return result
    finally:
        await admin.close()


class RequestProducer:
    """Puts requests on the requests topic, keyed by request id (so a request keeps its partition)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.kafka_bootstrap, "no broker configured"
        self._topic = settings.topics.requests
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, client_id=settings.kafka_client_id,
            acks="all", enable_idempotence=settings.kafka_idempotence, linger_ms=5,
            max_request_size=8 * 1024 * 1024,
        )

    async def __aenter__(self) -> RequestProducer:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()

    async def send(self, request: RequestRecord) -> asyncio.Future:  # type: ignore[type-arg]
        return await self._producer.send(self._topic, key=request.request_id.encode(),
                                         value=request.model_dump_json().encode())

    async def send_raw(self, key: bytes | None, value: bytes) -> asyncio.Future:  # type: ignore[type-arg]
        """For producing bytes as received (``echolm produce`` never drops a line it cannot parse)."""
        return await self._producer.send(self._topic, key=key, value=value)

    async def send_all(self, requests: Iterable[RequestRecord]) -> int:
        futures = [await self.send(r) for r in requests]
        await asyncio.gather(*futures)
        return len(futures)


class ResponseCollector:
    """Reads the responses topic (or another) from the offsets it had when opened, without a group.

    Opening before producing guarantees no response is missed; no group means no rebalance wait
    and nothing to clean up on the broker.
    """

    def __init__(self, settings: Settings, topic: str | None = None) -> None:
        assert settings.kafka_bootstrap, "no broker configured"
        self._topic = topic or settings.topics.responses
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, client_id=f"{settings.kafka_client_id}-collector",
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )

    async def __aenter__(self) -> ResponseCollector:
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self._topic)
        for _ in range(50):
            if partitions:
                break
            await asyncio.sleep(0.1)
            await self._consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
            partitions = self._consumer.partitions_for_topic(self._topic)
        if not partitions:
            raise RuntimeError(f"topic {self._topic} does not exist: run `echolm topics create` first")
        assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        ends = await self._consumer.end_offsets(assigned)
        for tp, offset in ends.items():
            self._consumer.seek(tp, offset)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._consumer.stop()

    async def batches(self, timeout_s: float = 1.0) -> AsyncIterator[list[ResponseRecord | bytes]]:
        """Yields lists of decoded responses (raw bytes where a record does not decode); [] on idle."""
        while True:
            fetched = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=500)
            out: list[ResponseRecord | bytes] = []
            for messages in fetched.values():
                for message in messages:
                    try:
                        out.append(ResponseRecord.model_validate_json(message.value))
                    except Exception:
                        out.append(message.value)
            yield out
