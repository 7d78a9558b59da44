"""Which generator the factory builds: llama.cpp tiers share one thread when they would oversubscribe the cores."""

from __future__ import annotations

from echolm.generation.factory import llamacpp_tiers_share_a_thread
from echolm.settings import Settings


def test_tiers_share_a_thread_when_their_threads_exceed_the_cores() -> None:
    two_tiers = Settings()  # small and large on llama.cpp, each with every core
    assert llamacpp_tiers_share_a_thread(two_tiers, cpu_count=2)
    split = two_tiers.model_copy(update={"tiers": [t.model_copy(update={"n_threads": 8}) for t in two_tiers.tiers]})
    assert not llamacpp_tiers_share_a_thread(split, cpu_count=16)
    assert llamacpp_tiers_share_a_thread(split, cpu_count=12)
    one_tier = two_tiers.model_copy(update={"tiers": two_tiers.tiers[:1]})
    assert not llamacpp_tiers_share_a_thread(one_tier, cpu_count=2)
    forced = two_tiers.model_copy(update={"llamacpp_shared_thread": False})
    assert not llamacpp_tiers_share_a_thread(forced, cpu_count=2)


def test_a_worker_generating_on_llamacpp_embeds_on_one_torch_thread() -> None:
    from streams.app import WorkerPlan, one_torch_thread_beside_llamacpp

    settings = Settings()
    everything = WorkerPlan.for_stage("all", settings)
    assert one_torch_thread_beside_llamacpp(settings, everything).embedder_threads == 1
    # A worker without a llama.cpp generator, or a user's explicit choice, keeps torch's threads.
    assert one_torch_thread_beside_llamacpp(settings, WorkerPlan.for_stage("embed", settings)).embedder_threads is None
    chosen = settings.model_copy(update={"embedder_threads": 2})
    assert one_torch_thread_beside_llamacpp(chosen, everything).embedder_threads == 2
    served = settings.model_copy(update={"tiers": [t.model_copy(update={"backend": "openai"}) for t in settings.tiers]})
    assert one_torch_thread_beside_llamacpp(served, everything).embedder_threads is None
