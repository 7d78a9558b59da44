# EchoLM's CPU image: the CLI and every pipeline stage worker (`echolm worker --stage ...`).
# Generation on GPUs runs in separate vLLM servers (see docker-compose.yml).
#
#   docker build -t echolm:0.1.0 .
#
# torch is pinned in pyproject.toml; on Linux the default package index serves its CUDA build.
# To install the much smaller CPU build instead, pass the CPU wheel index of PyTorch:
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU wheel index> -t echolm:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: compile wheels (llama-cpp-python ships only as a source distribution) ----------------
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY echolm ./echolm
COPY streams ./streams
RUN pip wheel --wheel-dir /wheels .

# ---- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# Migrations ship in the source tree, not in the wheel (see echolm/history/migrate.py).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    ECHOLM_MIGRATIONS_DIR=/opt/echolm/migrations \
    ECHOLM_DATA_DIR=/var/lib/echolm \
    ECHOLM_MODEL_CACHE_DIR=/var/cache/echolm \
    HF_HUB_OFFLINE=1
# libgomp: OpenMP runtime of llama.cpp and faiss.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels echolm \
    && rm -rf /tmp/wheels
COPY migrations /opt/echolm/migrations
# A fixed, unprivileged user; volumes mounted on these directories inherit their ownership.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/echolm echolm \
    && mkdir -p /var/lib/echolm /var/cache/echolm \
    && chown echolm:echolm /var/lib/echolm /var/cache/echolm
USER echolm
WORKDIR /home/echolm
EXPOSE 9400
CMD ["echolm", "--help"]
