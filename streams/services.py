"""The composition root of a worker: builds each ``echolm`` adapter from ``Settings``, once, lazily.

Built inside the running event loop (database engines and model threads bound to another loop
break), and only for the stages this worker runs: a log-only worker never loads a model.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from echolm.protocols import AdmissionHook, Embedder, Generator, HistoryStore, Router
from echolm.retrieval.example_cache import ExampleCache
from echolm.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_object(path: str) -> Any:
    """'package.module:attribute' -> the attribute (admission hooks and other plug-ins)."""
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    return getattr(importlib.import_module(module_name), attribute)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._built: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _once(self, key: str, build: Callable[[], Awaitable[T]]) -> T:
        if key in self._built:
            return self._built[key]  # type: ignore[no-any-return]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._built:
                self._built[key] = await build()
        return self._built[key]  # type: ignore[no-any-return]

    async def embedder(self) -> Embedder:
        async def build() -> Embedder:
            from echolm.retrieval.embedder import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder(self.settings.embedder_model,
                                                   batch_size=self.settings.embed_batch_size,
                                                   num_threads=self.settings.embedder_threads,
                                                   dtype=self.settings.embedder_dtype)
            if self.settings.embedder_warm_up_shapes:
                shapes = await asyncio.to_thread(embedder.warm_up_shapes, self.settings.stage_batch_size)
            else:
                shapes = len(await asyncio.to_thread(embedder.embed, ["warm up"]))
            log.info("embedder %s ready (dimension %d, %d input shapes warmed)", self.settings.embedder_model,
                     embedder.dimension, shapes)
            return embedder

        return await self._once("embedder", build)

    async def history(self) -> HistoryStore:
        async def build() -> HistoryStore:
            from echolm.history.store import SqlHistoryStore

            store = SqlHistoryStore(self.settings.resolved_database_url)
            await store.start()
            return store

        return await self._once("history", build)

    async def example_cache(self) -> ExampleCache:
        async def build() -> ExampleCache:
            if "embedder" in self._built:
                dimension = (await self.embedder()).dimension
            else:  # a worker that only retrieves sizes its index without loading the model
                from echolm.retrieval.embedder import embedding_dimension

                dimension = await asyncio.to_thread(embedding_dimension, self.settings.embedder_model)
            cache = ExampleCache.from_settings(dimension, self.settings)
            await cache.sync_from(await self.history())
            log.info("example cache loaded: %d examples", len(cache))
            return cache

        return await self._once("example_cache", build)

    async def router(self) -> Router:
        async def build() -> Router:
            from echolm.routing.factory import make_router

            return make_router(self.settings)

        return await self._once("router", build)

    async def generator(self, tier_name: str) -> Generator:
        async def build() -> Generator:
            from echolm.generation.factory import make_generator

            tier = self.settings.tier(tier_name)
            generator = make_generator(tier, self.settings)
            start = getattr(generator, "start", None)
            if start is not None:
                await start()
            log.info("tier %s ready: %s via %s", tier.name, generator.model_name, tier.backend)
            return generator

        return await self._once(f"generator:{tier_name}", build)

    def admission_hook(self) -> AdmissionHook:
        from streams.stages import accept_all

        path = self.settings.admission_hook
        return load_object(path) if path else accept_all

    async def aclose(self) -> None:
        for key, service in list(self._built.items()):
            closer = getattr(service, "aclose", None)
            if closer is not None:
                try:
                    await closer()
                except Exception:  # closing must not hide the original shutdown reason
                    log.exception("closing %s failed", key)
        self._built.clear()
