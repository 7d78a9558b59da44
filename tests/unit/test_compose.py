"""docker-compose.yml and the Dockerfile, checked without Docker (no engine runs on our machines).

The compose file is parsed as YAML, its ``${VAR:-default}`` interpolation is resolved the way
Compose does, and every EchoLM service's environment is loaded into the real ``Settings``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from echolm.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The one value Compose refuses to default: it must come from the operator's environment.
TEST_ENVIRONMENT = {"POSTGRES_PASSWORD": "compose-test-password"}

INFRA = {"kafka", "postgres"}
JOBS = {"migrate", "topics"}
VLLM_SERVERS = {"vllm-small", "vllm-large"}
PIPELINE_WORKERS = {"embed", "retrieve", "route", "generate-small", "generate-large", "log"}
# Off the request path (issue 3): each registered optional stage in a container of its own.
LEARNING_WORKERS = {"feedback", "judge", "example-stats", "learn", "replay", "evict"}
WORKERS = PIPELINE_WORKERS | LEARNING_WORKERS
# Container paths that must match the volume mounts, so they are fixed rather than configurable.
FIXED_ECHOLM_VARIABLES = {"ECHOLM_DATA_DIR", "ECHOLM_MODEL_CACHE_DIR"}
SECRETS = {"POSTGRES_PASSWORD", "ECHOLM_OPENAI_API_KEY", "HF_TOKEN", "VLLM_API_KEY"}

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(ValueError):
    pass


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"]
        current = environment.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and (current is None if op == "-" else unset_or_empty):
            return arg
        if op in (":?", "?") and (current is None if op == "?" else unset_or_empty):
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def resolve(node: Any, environment: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environment)
    if isinstance(node, list):
        return [resolve(item, environment) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, environment) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    return resolve(raw, TEST_ENVIRONMENT)


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def settings_variable_names(model: type[BaseModel] = Settings, prefix: str = "ECHOLM_") -> set[str]:
    """Every variable pydantic-settings reads: ECHOLM_<FIELD>, and ECHOLM_<FIELD>__<SUB> for nested models."""
    names = set()
    for name, info in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        names.add(variable)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= settings_variable_names(info.annotation, f"{variable}__")
    return names


def echolm_services(compose: Mapping[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in compose["services"].items() if str(s.get("image", "")).startswith("echolm:")}


def load_settings(environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for key in list(os.environ):
        if key.startswith("ECHOLM_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        if key.startswith("ECHOLM_"):
            monkeypatch.setenv(key, value)
    return Settings()


def seconds(duration: str) -> float:
    """A Compose duration such as '90s', '1m30s', '2h'."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def vllm_flag(service: Mapping[str, Any], flag: str) -> str:
    for arg in service["command"]:
        if str(arg).startswith(f"--{flag}="):
            return str(arg).split("=", 1)[1]
    raise AssertionError(f"--{flag} not set")


# ------------------------------------------------------------------------------------------ tests


def test_the_file_parses_and_has_every_service(compose):
    assert set(compose["services"]) >= INFRA | JOBS | VLLM_SERVERS | WORKERS


def test_a_missing_postgres_password_is_refused_not_defaulted(raw):
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        resolve(raw, {})


def test_every_echolm_variable_is_a_real_setting(compose):
    allowed = settings_variable_names()
    assert "ECHOLM_TOPICS__PREFIX" in allowed and "ECHOLM_KAFKA_IDEMPOTENCE" in allowed
    for name, service in compose["services"].items():
        unknown = {key for key in environment_of(service) if key.startswith("ECHOLM_")} - allowed
        assert not unknown, f"{name} sets {sorted(unknown)}, which Settings does not read"


def test_every_echolm_setting_comes_from_the_environment_with_a_default(raw):
    for name, service in raw["services"].items():
        for key, value in environment_of(service).items():
            if key.startswith("ECHOLM_") and key not in FIXED_ECHOLM_VARIABLES:
                assert "${" in value, f"{name}: {key} is hard-coded ({value!r}); use ${{VAR:-default}}"


def test_secrets_are_never_written_into_the_file(raw):
    for name, service in raw["services"].items():
        for key, value in environment_of(service).items():
            if key in SECRETS:
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value), f"{name}: {key} = {value!r}"
                assert not re.search(r":-.+\}$", value), f"{name}: {key} has a non-empty default"


def test_each_echolm_service_environment_loads_into_settings(compose, monkeypatch):
    services = echolm_services(compose)
    assert set(services) == JOBS | WORKERS
    for name, service in services.items():
        settings = load_settings(environment_of(service), monkeypatch)
        assert settings.kafka_idempotence, f"{name}: Apache Kafka supports idempotent producers"
        assert not settings.uses_embedded_broker
        assert urlsplit(f"//{settings.kafka_bootstrap}").hostname == "kafka"
        database = urlsplit(settings.resolved_database_url)
        assert (database.scheme, database.hostname) == ("postgresql+asyncpg", "postgres")
        assert database.password == TEST_ENVIRONMENT["POSTGRES_PASSWORD"]
        assert settings.topics.partitions >= 1 and settings.topics.prefix == "echolm"
        assert settings.metrics_port is not None
        assert settings.openai_api_key is None or settings.openai_api_key.get_secret_value() == ""


def test_tiers_call_the_vllm_servers_by_their_served_model_names(compose, monkeypatch):
    services = compose["services"]
    settings = load_settings(environment_of(services["embed"]), monkeypatch)
    assert {t.name for t in settings.tiers} == {"small", "large"}
    assert set(settings.admit_from_tiers) <= {t.name for t in settings.tiers}
    for tier in settings.tiers:
        assert tier.backend == "openai"
        url = urlsplit(tier.base_url)
        server = services[url.hostname]
        assert url.path == "/v1"
        assert str(url.port) in {str(p) for p in server["expose"]}
        assert tier.model == vllm_flag(server, "served-model-name") == server["command"][0]
        assert tier.n_ctx == int(vllm_flag(server, "max-model-len"))
    small, large = settings.tier("small"), settings.tier("large")
    assert small.relative_cost < large.relative_cost and small.use_examples and not large.use_examples


def test_all_echolm_services_share_one_configuration(compose):
    environments = [environment_of(s) for s in echolm_services(compose).values()]
    assert all(env == environments[0] for env in environments)


def test_workers_cover_every_stage_and_every_tier(compose, monkeypatch):
    from streams.app import available_stages

    services = compose["services"]
    settings = load_settings(environment_of(services["embed"]), monkeypatch)
    served_tiers = set()
    stages = set()
    for name in WORKERS:
        command = services[name]["command"]
        assert command[:3] == ["echolm", "worker", "--stage"], name
        stages.add(command[3])
        if command[3] == "generate":
            tiers = [command[i + 1] for i, arg in enumerate(command) if arg == "--tier"]
            assert tiers, f"{name}: a generate worker must name its tier"
            served_tiers |= set(tiers)
    assert stages == set(available_stages()), "one service per stage `echolm worker --stage` knows"
    assert all(services[name]["command"][3] == name for name in LEARNING_WORKERS)
    assert served_tiers == {t.name for t in settings.tiers}
    assert services["migrate"]["command"] == ["echolm", "migrate"]
    assert services["topics"]["command"] == ["echolm", "topics", "create"]


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag {tag!r} names no version"


def test_vllm_servers_reserve_a_gpu_each_and_keep_prefix_caching_on(compose):
    devices_by_server = {}
    for name in VLLM_SERVERS:
        service = compose["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
        devices_by_server[name] = tuple(tuple(d.get("device_ids", ())) for d in devices)
        assert "--enable-prefix-caching" in service["command"]
        assert service["entrypoint"] == ["vllm", "serve"]
    assert len(set(devices_by_server.values())) == len(VLLM_SERVERS), "two servers on one GPU by default"


def test_healthchecks_and_start_order(compose):
    services = compose["services"]
    for name in INFRA | VLLM_SERVERS | WORKERS:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if dependency in JOBS else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {dependency}"
    for name in JOBS | WORKERS:
        assert {"kafka", "postgres"} <= set(services[name]["depends_on"]), name
    for name in WORKERS:
        assert JOBS <= set(services[name]["depends_on"]), name
    assert "vllm-small" in services["generate-small"]["depends_on"]
    assert "vllm-large" in services["generate-large"]["depends_on"]


def test_restart_policies_and_grace_periods(compose, monkeypatch):
    services = compose["services"]
    settings = load_settings(environment_of(services["embed"]), monkeypatch)
    for name in JOBS:
        assert re.fullmatch(r"on-failure(:\d+)?", services[name]["restart"]), name
    for name in INFRA | VLLM_SERVERS | WORKERS:
        assert services[name]["restart"] in ("unless-stopped", "always"), name
        assert seconds(services[name]["stop_grace_period"]) >= 30, name
    for tier in settings.tiers:
        grace = seconds(services[f"generate-{tier.name}"]["stop_grace_period"])
        assert grace > tier.timeout_s, f"generate-{tier.name} may be killed mid-generation"
    replay_tier = settings.tier(settings.replay.tier) if settings.replay.tier else settings.largest_tier
    assert seconds(services["replay"]["stop_grace_period"]) > replay_tier.timeout_s, "replay killed mid-sample"
    assert seconds(services["judge"]["stop_grace_period"]) > settings.learning.judge_timeout_s, "judge killed mid-call"


def server_of(services: Mapping[str, Any], settings: Settings, tier_name: str) -> str:
    """The compose service behind a tier's OpenAI-compatible URL."""
    host = urlsplit(settings.tier(tier_name).base_url).hostname
    assert host in services, f"tier {tier_name} calls {host}, not a service of this file"
    return host


def test_learning_stages_are_configured_to_do_their_work(compose, monkeypatch):
    services = compose["services"]
    settings = load_settings(environment_of(services["judge"]), monkeypatch)
    assert 0 < settings.learning.judge_sample_rate <= 1
    assert settings.replay.enabled and settings.replay.judge_tier in {t.name for t in settings.tiers}
    assert settings.eviction.max_bytes and settings.eviction.max_examples, "evict without a budget does nothing"
    largest = settings.largest_tier.name
    judge_tiers = {settings.learning.reference_tier or largest, settings.learning.judge_tier or largest}
    replay_tiers = {settings.replay.tier or largest, settings.replay.judge_tier}
    for name, tiers in (("judge", judge_tiers), ("replay", replay_tiers)):
        for tier in tiers:
            assert server_of(services, settings, tier) in services[name]["depends_on"], f"{name} calls {tier}"


def test_metrics_ports_are_exposed_and_probed(compose, monkeypatch):
    for name in WORKERS:
        service = compose["services"][name]
        port = environment_of(service)["ECHOLM_METRICS_PORT"]
        assert port in {str(p) for p in service["expose"]}, name
        assert "/metrics" in " ".join(service["healthcheck"]["test"])


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
    assert {"kafka-data", "postgres-data"} <= declared


def test_the_tiers_json_is_valid_even_with_operator_overrides(raw, monkeypatch):
    overrides = {**TEST_ENVIRONMENT, "SMALL_MODEL": "org/tiny", "SMALL_CONCURRENCY": "8", "LARGE_TIMEOUT_S": "300"}
    env = environment_of(resolve(raw, overrides)["services"]["route"])
    tiers = {t["name"]: t for t in json.loads(env["ECHOLM_TIERS"])}
    assert (tiers["small"]["model"], tiers["small"]["concurrency"], tiers["large"]["timeout_s"]) == ("org/tiny", 8, 300)
    assert load_settings(env, monkeypatch).tier("small").model == "org/tiny"


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} $SET $$SET", env) == "x d d  x $SET"
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?needed}", env)


def test_dockerfile_builds_a_pinned_python_image_and_runs_unprivileged():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    image_arg = next(line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim(-\w+)?", image_arg)
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    runtime = lines[stages[-1]:]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("COPY migrations") for line in runtime)
    assert any("pip install" in line and "echolm" in line for line in runtime)
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(dockerignore)
