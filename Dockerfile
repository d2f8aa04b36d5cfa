# syntax=docker/dockerfile:1
# The serve-app image: the demo models baked in, `serve run` on configs/serve_config.yaml as
# CMD, and ready for KubeRay, whose pods run `ray start` in it with their own command.
#
#   make image        # = docker build -t ghcr.io/serve-app/serve-app:0.1.0-ray2.60.0 .
#
# Behind a TLS-intercepting proxy, hand pip its CA as a build secret (never stored in a layer):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# docs/container.md has the details; tests/test_image.py builds, runs and queries this file.

# Any Debian bookworm with Python 3.11 (python3, python3-venv) fits. The default is the
# official slim image; rayproject/ray adds Anaconda and every Ray library's dependencies, and
# Ray comes at the same pin from the lock either way (docs/container.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: what the image needs besides Python; shared by all stages, so built once.
FROM ${BASE_IMAGE} AS base
# wget and bash: KubeRay's readiness/liveness probes run `bash -c "wget ..."`.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray --shell /bin/bash ray
# The venv's bin first on PATH: a login-less bash (KubeRay's `ray start`) finds ray and serve.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/ray \
    PYTHONUNBUFFERED=1 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_HAPROXY_RETRY_ON="conn-failure empty-response" \
    RAY_SERVE_HAPROXY_METRICS_ENABLED=0 \
    RAY_USAGE_STATS_ENABLED=0

# ---- deps: the locked runtime dependencies in a virtualenv; rebuilt only when the lock changes.
# The lock stays in the image: the exact, hash-checked list of what /opt/venv holds.
FROM base AS deps
COPY requirements/lock.txt /opt/requirements-lock.txt
# A TLS-intercepting proxy's CA arrives as a build secret: in no layer, verification stays on.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir --disable-pip-version-check --require-hashes \
      -r /opt/requirements-lock.txt

# ---- build: the project's wheel, and the demo models trained into the store.
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
      --wheel-dir /dist . \
 && pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index /dist/*.whl
WORKDIR /home/ray/app
COPY configs ./configs
RUN python -m serve_app.tools.train --store model_store

# ---- the image: deps plus the project; no sources, wheels, caches or secrets.
FROM deps
# A COPY, not a bind mount from the build stage: buildah would reuse a cached RUN after the
# wheel changed. The project's layers come after the dependencies' (cache-friendly).
COPY --from=build /dist /tmp/dist
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index /tmp/dist/*.whl \
 && rm -r /tmp/dist
COPY --from=build --chown=1000:100 /home/ray/app /home/ray/app
LABEL org.opencontainers.image.title="serve-app" \
      org.opencontainers.image.description="scikit-learn and XGBoost models on Ray Serve (KServe V1, Open Inference Protocol V2)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid 1000, gid 100 (users), as in rayproject images; numeric, so runAsNonRoot can verify it.
USER 1000:100
WORKDIR /home/ray/app
# Serve HTTP, Serve gRPC, Ray dashboard, Ray metrics (each movable: serve_app/tools/container.py).
EXPOSE 8000 9000 8265 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "wget -q -O /dev/null http://127.0.0.1:${SERVE_PORT:-8000}/-/healthz || exit 1"]
CMD ["python", "-m", "serve_app.tools.container"]
