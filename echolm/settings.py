"""One settings object for every part of EchoLM.

Every field can be set by an ``ECHOLM_<FIELD>`` environment variable (nested fields with ``__``,
lists and tier tables as JSON) or by CLI flags, which the CLI maps onto the same fields. Nothing
else in the code base reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from echolm.affinity import GenerateAffinity
from echolm.domain import REUSE_TIER
from echolm.prompting import PromptLayout

GeneratorBackend = Literal["llamacpp", "openai", "vllm", "echo"]


class TierSettings(BaseModel):
    """One model tier: a model behind a generation backend, with its relative cost."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,30}$", description="tier name, used in topic names")
    backend: GeneratorBackend = "llamacpp"
    model: str = Field(description="model registry name (see `echolm models list`), a .gguf path, or a server model id")
    relative_cost: float = Field(gt=0, description="cost of a request on this tier relative to the cheapest")
    concurrency: int = Field(default=1, ge=1, description="requests generated at once by one worker")
    max_tokens: int = Field(default=256, ge=1, description="default completion limit")
    timeout_s: float = Field(default=120.0, gt=0, description="hard limit for one generation call")
    n_ctx: int = Field(default=4096, ge=256, description="context window (llama.cpp)")
    n_threads: int | None = Field(default=None, description="llama.cpp CPU threads (None: all cores)")
    prefix_cache_mb: int = Field(
        default=256, ge=0,
        description="llama.cpp: memory for earlier prompts' KV states, so a prompt that starts like one "
                    "(same system prompt and examples) prefills only the rest; 0 turns prompt reuse off, "
                    "even of the previous prompt (every prompt prefilled in full)",
    )
    lookup_draft_tokens: int = Field(
        default=0, ge=0, le=64,
        description="llama.cpp: prompt lookup decoding, drafting up to this many tokens from where the "
                    "context's last tokens occurred before (an example's answer the model follows) and "
                    "checking them in one pass; 0 turns it off (echolm.generation.llamacpp_lookup)",
    )
    base_url: str | None = Field(default=None, description="OpenAI-compatible server URL (backend=openai)")
    use_examples: bool = Field(default=True, description="prepend retrieved examples when routed here")
    simulated_latency_s: float = Field(default=0.0, ge=0, description="echo backend only: delay per request")
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description='vllm backend only: extra AsyncEngineArgs, e.g. {"gpu_memory_utilization": 0.4}',
    )


def _default_tiers() -> list[TierSettings]:
    return [
        TierSettings(name="small", model="qwen2.5-coder-0.5b-instruct", relative_cost=1.0, use_examples=True),
        TierSettings(name="large", model="qwen2.5-coder-1.5b-instruct", relative_cost=3.0, use_examples=False),
    ]


class TopicSettings(BaseModel):
    """Topic names; every stage reads one and writes the next, keyed by request id."""

    model_config = ConfigDict(frozen=True)

    prefix: str = "echolm"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    def name(self, stage: str) -> str:
        return f"{self.prefix}.{stage}"

    @property
    def requests(self) -> str:
        return self.name("requests")

    @property
    def embedded(self) -> str:
        return self.name("embedded")

    @property
    def retrieved(self) -> str:
        return self.name("retrieved")

    def generate(self, tier: str) -> str:
        return self.name(f"generate.{tier}")

    @property
    def responses(self) -> str:
        return self.name("responses")

    @property
    def dead_letter(self) -> str:
        return self.name("dead-letter")

    @property
    def feedback(self) -> str:
        return self.name("feedback")

    @property
    def load(self) -> str:
        """Generate workers' load reports (read by route workers for the load-aware router)."""
        return self.name("load")


class ReplaySettings(BaseModel):
    """The replay agent: regenerates weak, much-used examples on the large tier while it is idle."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(default=True, description="run the replay agent in workers that include the 'replay' stage")
    tier: str | None = Field(default=None, description="tier that regenerates examples (None: the costliest)")
    interval_s: float = Field(default=10.0, gt=0, description="how often the agent looks for idle capacity")
    idle_threshold: float = Field(default=0.2, gt=0, description="replay only while the tier's load EMA (busy fraction) is below this")
    idle_scope: Literal["tier", "all-tiers"] = Field(
        default="all-tiers",
        description="whose load must be under idle_threshold: the replay tier's only (tiers on hardware of their "
                    "own), or every tier's (tiers sharing a machine, as llama.cpp tiers share the CPU: replaying "
                    "while the small tier serves would slow its traffic)",
    )
    load_window_s: float = Field(default=30.0, gt=0, description="history window of the load estimate")
    load_half_life_s: float = Field(default=10.0, gt=0, description="half-life of the load EMA")
    samples: int = Field(default=3, ge=1, le=16, description="answers generated per replay; the judge keeps the best")
    temperature: float = Field(default=0.7, ge=0, le=2, description="sampling temperature of replay answers")
    max_tokens: int | None = Field(default=None, ge=1, description="completion limit of replay answers (None: the tier's)")
    examples_per_round: int = Field(default=4, ge=1, description="examples replayed per round at most")
    max_rounds: int = Field(default=5, ge=1, le=5, description="replays per cache entry at most (paper: 5)")
    cost_per_sample: float = Field(default=0.05, ge=0, description="one replay sample's cost in G's normalised units (the cut-off)")
    gain_smoothing: float = Field(default=0.2, gt=0, le=1, description="EMA factor of the potential gain G(e)")
    default_quality: float = Field(default=0.5, ge=0, le=1, description="quality of a use without feedback or judge verdict (neutral)")
    bad_quality_below: float = Field(default=0.45, ge=0, le=1, description="a use below this quality is not a successful offload")
    settle_after_s: float = Field(default=60.0, ge=0, description="a use waits this long for feedback before it counts")
    judge: Literal["auto", "llm", "verifier", "heuristic"] = Field(
        default="auto", description="auto: LLM judge if judge_tier is set, else a verifier where a reference exists, else heuristic"
    )
    judge_tier: str | None = Field(default=None, description="tier that judges replay answers pairwise (the LLM judge)")
    references_path: Path | None = Field(default=None, description="JSONL {prompt, reference, kind: numeric|program|python} for task verifiers")
    min_improvement: float = Field(default=0.0, ge=0, description="a new version only if the best answer beats the current one by more")


class EvictionSettings(BaseModel):
    """Utility-aware eviction: a 0/1 knapsack per tenant under a byte and/or row budget."""

    model_config = ConfigDict(frozen=True)

    max_bytes: int | None = Field(default=None, ge=0, description="per tenant: prompt + response + embedding bytes kept at most")
    max_examples: int | None = Field(default=None, ge=0, description="per tenant: active examples kept at most")
    interval_s: float = Field(default=300.0, gt=0, description="how often the 'evict' stage checks the budgets")
    decay_per_hour: float = Field(default=0.9, gt=0, le=1, description="decay of the successful-offload value per hour")
    protect_new_s: float = Field(default=3600.0, ge=0, description="examples younger than this are never evicted")


class LearningSettings(BaseModel):
    """The quality signal (feedback, the judge) and stage 2 of retrieval (the helpfulness proxy)."""

    model_config = ConfigDict(frozen=True)

    judge_sample_rate: float = Field(default=0.05, ge=0, le=1, description="share of live responses the 'judge' stage judges (stable hash of the request id)")
    judge_tier: str | None = Field(default=None, description="tier whose model judges pairwise (None: the costliest); judge_model overrides it")
    judge_model: TierSettings | None = Field(default=None, description="a judge model or endpoint outside the routed tiers (JSON, like a tier)")
    reference_tier: str | None = Field(default=None, description="tier whose answer offloaded answers are judged against (None: the costliest)")
    judge_max_tokens: int = Field(default=192, ge=8, description="completion limit of one judge reply")
    judge_timeout_s: float = Field(default=120.0, gt=0, description="limit for one judge or reference generation")
    references_path: Path | None = Field(default=None, description="JSONL {prompt, reference, kind: numeric|program|python[, setup]}: task verifiers for requests with references")
    selection_threshold: float = Field(default=0.5, ge=-1, le=1, description="stage 2 at cold start: minimum similarity of a kept example (a trained proxy stores its own threshold)")
    max_examples: int = Field(default=5, ge=0, description="examples kept per request at most (stage 2)")
    model_poll_interval_s: float = Field(default=10.0, gt=0, description="how often workers look for a newly stored selector or router model")
    helped_quality: float = Field(default=0.5, ge=0, le=1, description="an outcome at least this good (0.5 = parity with the reference tier) counts as 'the examples helped'")
    online_interval_s: float = Field(default=60.0, gt=0, description="'learn' stage: how often new feedback updates the stored router")
    selector_refit_interval_s: float = Field(default=3600.0, gt=0, description="'learn' stage: how often the helpfulness proxy is retrained and its threshold re-chosen")


class BanditSettings(BaseModel):
    """The load-aware contextual bandit router (router_policy=bandit)."""

    model_config = ConfigDict(frozen=True)

    epsilon: float = Field(default=0.05, ge=0, le=1, description="share of requests routed to a random tier (exploration, only below the load threshold)")
    load_threshold: float | None = Field(default=None, description="load above which costlier tiers are penalised (None: the value stored by `echolm router calibrate`, else 1.0)")
    lambda0: float = Field(default=1.0, ge=0, description="largest load bias, in utility units per unit of relative cost")
    gamma: float = Field(default=2.0, gt=0, description="how fast the bias grows past the threshold (tanh slope)")
    temperature: float = Field(default=0.1, gt=0, description="softmax temperature over the biased scores")
    policy: Literal["softmax", "argmax"] = Field(default="softmax", description="sample a tier from softmax(S / temperature) (the paper), or serve the top score")
    uniform_std: float = Field(default=0.1, ge=0, description="scores with a std below this are 'nearly uniform': selective feedback")
    compare_rate: float = Field(default=0.02, ge=0, le=1, description="share of requests at most that get a second generation for a pairwise comparison")
    load_tier: str | None = Field(default=None, description="tier whose load EMA drives the bias (None: the costliest)")
    load_half_life_s: float = Field(default=5.0, gt=0, description="half-life of the per-tier load EMA")
    load_report_interval_s: float = Field(default=1.0, gt=0, description="how often generate workers publish their backlog")
    load_stale_after_s: float = Field(default=5.0, gt=0, description="a worker's load report older than this no longer counts")
    cost_refresh_interval_s: float = Field(default=60.0, gt=0, description="how often route workers re-measure per-tier token costs from the history")
    seed: int | None = Field(default=None, description="random seed of exploration (None: from the OS)")


class Settings(BaseSettings):
    """All of EchoLM's configuration. Construct once at the entry point and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="ECHOLM_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    # Where things live
    data_dir: Path = Field(default=Path(".echolm"), description="embedded database, broker logs, run files")
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "echolm",
        description="assembled model weights and downloaded data packages (shared by every checkout)",
    )

    migrations_dir: Path | None = Field(
        default=None, description="Alembic migrations; unset = migrations/ beside the package (editable install)"
    )

    # Kafka
    kafka_bootstrap: str | None = Field(
        default=None, description="host:port[,host:port]; unset = start an embedded Tansu broker"
    )
    kafka_idempotence: bool = Field(default=False, description="idempotent producer (Apache Kafka only)")
    kafka_client_id: str = Field(default="echolm", description="Kafka client id prefix")
    topics: TopicSettings = Field(default_factory=TopicSettings, description="topic prefix, partitions, replication (ECHOLM_TOPICS__PREFIX ...)")
    consumer_group: str = Field(default="echolm", description="consumer group prefix; each stage adds its name")
    # Short group timeouts: the faust defaults make a worker wait ~30 s to join.
    rebalance_timeout_s: float = Field(default=5.0, description="group rebalance timeout (short: fast joins)")
    session_timeout_s: float = Field(default=10.0, description="a silent worker leaves the group after this")
    heartbeat_interval_s: float = Field(default=1.0, description="group heartbeat interval")
    fetch_max_wait_ms: int = Field(default=100, ge=0, description="longest a worker's fetch waits for data (faust fixes 1500; Tansu answers multi-topic fetches only then)")
    stage_batch_size: int = Field(default=32, ge=1, description="events a stage takes at once")
    stage_batch_window_s: float = Field(default=0.05, gt=0, description="how long a stage waits to fill a batch")

    # Database
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; unset = SQLite in data_dir"
    )

    # Embedding and retrieval
    embedder_model: str = Field(default="all-MiniLM-L6-v2", description="bundled name or a local model path")
    embed_batch_size: int = Field(default=64, ge=1, description="texts per embedder call")
    embedder_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 where the CPU has native bf16 (~1.5x faster, cosine >= 0.998)"
    )
    llamacpp_shared_thread: bool | None = Field(
        default=None,
        description="run every llama.cpp tier of a process on one compute thread, one generation at a time. "
                    "None: when the tiers' threads together exceed the CPU cores, where llama.cpp's OpenMP "
                    "runtime would otherwise cut its spin-waits and every tier decode about a quarter slower, even alone",
    )
    embedder_threads: int | None = Field(default=None, ge=1, description="torch threads for embedding (1 on machines shared with LLMs)")
    embedder_warm_up_shapes: bool = Field(
        default=True, description="workers run the embedder once per padded input shape at start (~7 s on one "
                                  "core) so its memory is level from the first request; off = one short text")
    retrieve_top_k: int = Field(default=5, ge=0, description="candidate examples retrieved per request")
    min_similarity: float = Field(default=0.5, ge=-1, le=1, description="candidates below are never used")
    ivf_min_examples: int = Field(default=50_000, description="switch a tenant's index to IVF (~sqrt(N) clusters) above this size")
    ivf_nprobe: int = Field(default=32, ge=1, description="IVF clusters searched per query (32: top-5 recall 0.996 at 100k)")
    cache_sync_interval_s: float = Field(default=0.5, gt=0, description="how often retrievers poll history")

    # Routing (the first, rule-based policy)
    router_policy: Literal["similarity", "always-large", "always-small", "bandit"] = Field(
        default="similarity", description="similarity: offload when close examples exist; bandit: learned, load-aware (ECHOLM_BANDIT__...); or a fixed tier"
    )
    offload_min_examples: int = Field(default=1, ge=0, description="close examples needed to offload")
    offload_min_similarity: float = Field(default=0.8, ge=-1, le=1, description="what counts as close (cosine)")
    reuse_min_similarity: float | None = Field(
        default=None, ge=-1, le=1,
        description="answer repeats verbatim from the cache (tier 'cache', no generation) when the best example is at "
                    "least this similar, e.g. 0.995 (MiniLM: paraphrases 0.97-0.99); unset = never: near-duplicates that differ need a new answer")
    reuse_min_quality: float = Field(default=0.5, ge=0, le=1, description="examples scored below this are never reused verbatim")
    generate_affinity: GenerateAffinity = Field(
        default="request",
        description="how offloaded requests spread over a tier's generate partitions: request (by request id, even) or "
                    "first-example (requests with the same first example on one worker, which keeps its prefix cache's "
                    "reuse when a tier has several generate workers)")

    # Generation
    tiers: list[TierSettings] = Field(default_factory=_default_tiers, description="model tiers as a JSON list")
    admit_from_tiers: list[str] = Field(default_factory=lambda: ["large"], description="tiers whose answers become examples")
    temperature: float = Field(default=0.0, ge=0, description="default sampling temperature")
    max_prompt_chars: int = Field(default=32_000, ge=1, description="requests longer than this are refused")
    max_examples_prompt_chars: int = Field(default=6_000, ge=0, description="budget for prepended examples")
    prompt_layout: PromptLayout = Field(
        default="hints-first", description="where hints go in the prompt: hints-first (request last), paper (request, hints, request again) or system (hints in the system message, user turns unchanged)"
    )
    admission_hook: str | None = Field(
        default=None, description="'module:callable' run before an answer becomes an example (PII scrubbing)"
    )
    openai_api_key: SecretStr | None = Field(
        default=None, description="bearer token for backend=openai tiers (hosted APIs); set it in the environment only"
    )

    # Service
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR")
    log_format: Literal["text", "json"] = Field(default="text", description="text, or json: one JSON object per line (ts, level, logger, message, request_id, stage)")
    metrics_port: int | None = Field(default=None, description="serve Prometheus metrics on this port")
    default_tenant: str = Field(default="default", description="tenant of requests that name none")

    # Replay agent and eviction (ECHOLM_REPLAY__..., ECHOLM_EVICTION__...)
    replay: ReplaySettings = Field(default_factory=ReplaySettings, description="replay agent (ECHOLM_REPLAY__SAMPLES ...)")
    eviction: EvictionSettings = Field(default_factory=EvictionSettings, description="eviction budgets (ECHOLM_EVICTION__MAX_BYTES ...)")

    # Quality signal, stage 2 and the bandit router (ECHOLM_LEARNING__..., ECHOLM_BANDIT__...)
    learning: LearningSettings = Field(default_factory=LearningSettings, description="feedback, judge, stage-2 selection (ECHOLM_LEARNING__JUDGE_SAMPLE_RATE ...)")
    bandit: BanditSettings = Field(default_factory=BanditSettings, description="bandit router (ECHOLM_BANDIT__EPSILON ...)")

    @field_validator("tiers")
    @classmethod
    def _unique_tier_names(cls, tiers: list[TierSettings]) -> list[TierSettings]:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        if not tiers:
            raise ValueError("at least one tier is required")
        return tiers

    @model_validator(mode="after")
    def _admission_tiers_exist(self) -> Settings:
        if any(t.name == REUSE_TIER for t in self.tiers):
            raise ValueError(f"tier name {REUSE_TIER!r} is reserved for answers reused from the cache")
        unknown = set(self.admit_from_tiers) - {t.name for t in self.tiers}
        if unknown:
            raise ValueError(f"admit_from_tiers names unknown tiers: {sorted(unknown)}")
        return self

    def tier(self, name: str) -> TierSettings:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"no tier named {name!r}; configured: {[t.name for t in self.tiers]}")

    @property
    def tiers_by_cost(self) -> list[TierSettings]:
        return sorted(self.tiers, key=lambda t: t.relative_cost)

    @property
    def largest_tier(self) -> TierSettings:
        return self.tiers_by_cost[-1]

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'echolm.db').resolve()}"

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.kafka_bootstrap


def settings_reference(effective: Settings | None = None) -> list[tuple[str, str, str]]:
    """(environment variable, default or effective value, description) for every setting."""
    import json

    rows = []
    values = effective.model_dump(mode="json") if effective else None
    for name, info in Settings.model_fields.items():
        if values is not None:
            value = values[name]
        else:
            value = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
            value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if isinstance(value, list):
                value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append((f"ECHOLM_{name.upper()}", shown if len(shown) <= 40 else shown[:37] + "...",
                     info.description or ""))
    return rows
