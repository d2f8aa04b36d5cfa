# Everything bootstraps .venv from pyproject.toml: a fresh clone needs only `make serve`
# (serve the demo models) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STORE  ?= ./model_store
CONFIG ?= configs/serve_config.yaml

# The fast path (docs/performance.md#fast-path): HAProxy in front of replicas that serve HTTP directly.
# Ray token authentication stays on; local clients read the token from ~/.ray/auth_token.
export RAY_SERVE_ENABLE_HA_PROXY ?= 1
# Predictions are idempotent: HAProxy resends a request whose replica died before answering
# (docs/reliability-security.md); Ray's default retries only failed connections.
export RAY_SERVE_HAPROXY_RETRY_ON ?= conn-failure empty-response
# No per-request log datagram from HAProxy for Serve's HTTP metrics (~100 µs of CPU a request);
# the app's own metrics count every model request (docs/monitoring.md). 1 brings them back.
export RAY_SERVE_HAPROXY_METRICS_ENABLED ?= 0
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
# Where Ray's dashboard reads time series for its Metrics view: the Prometheus of `make monitor`.
PROMETHEUS_PORT ?= 9090
export RAY_PROMETHEUS_HOST ?= http://127.0.0.1:$(PROMETHEUS_PORT)

.PHONY: venv system-tools bench-peers monitor soak serve stop train test test-unit test-serve bench clean help lock image manifests grpc-stubs

help:
	@echo "make serve   - serve the demo models on http://127.0.0.1:8000 and gRPC on 127.0.0.1:9000 (trains them if missing)"
	@echo "make test    - run the whole test suite"
	@echo "make train   - (re)train the demo models into $(STORE)"
	@echo "make stop    - stop the server make serve started (its Ray and HAProxy, nothing else)"
	@echo "make bench   - benchmark against a minimal Serve app, FastAPI and MLServer, 3 rounds (~50 min)"
	@echo "make monitor - Prometheus on http://127.0.0.1:$(PROMETHEUS_PORT) scraping a running make serve"
	@echo "make jupyter - JupyterLab on notebooks/ (docs/notebooks.md)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian tools the tests drive for real (Prometheus/promtool, image build, wrk, h2load for gRPC). Installed only when
# one is missing, so a laptop that has them is left alone; tests that need one skip without it
# on a laptop but fail under CI=true, where this target has installed them.
SYSTEM_TOOLS := prometheus:prometheus promtool:prometheus \
                buildah:buildah podman:podman debootstrap:debootstrap wrk:wrk chromium:chromium \
                redis-server:redis-server redis-cli:redis-tools openssl:openssl h2load:nghttp2-client
system-tools:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done | sort -u); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing tools (tests that need them will skip): $$missing"; fi; \
	fi

# MLServer, a peer the benchmark (and its smoke test) compares against, in a virtualenv of its
# own: it is never a dependency of the package.
MLSERVER_VENV := bench/.mlserver-venv
bench-peers: $(MLSERVER_VENV)/.installed

train: $(STAMP)
	$(BIN)/python -m serve_app.tools.train --store $(STORE)

# The RayService's generated part (serveConfigV2 = configs/serve_config.yaml, rayVersion, image
# tag) in cluster/base/generated/; run after changing the config or a version pin.
manifests: $(STAMP)
	$(BIN)/serve-app manifests

# The gRPC service's Python modules (serve_app/grpc/), regenerated from its .proto after an edit.
grpc-stubs: $(STAMP)
	$(BIN)/python -m serve_app.tools.grpc_stubs

# `make serve` records what it started in SERVE_RUN_FILE; `make stop` stops exactly that, never
# another checkout's, notebook's or test's Ray (serve_app/tools/supervisor.py).
SERVE_RUN_FILE ?= .serve-app/run.json
SERVE_ARGS ?=

serve: $(STAMP)
	$(BIN)/python -m serve_app.tools.train --store $(STORE) --if-missing
	$(BIN)/serve-app serve --config $(CONFIG) --run-file $(SERVE_RUN_FILE) $(SERVE_ARGS)

stop:
	$(BIN)/serve-app stop --run-file $(SERVE_RUN_FILE)

test: $(STAMP) system-tools bench-peers
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not serve and not image"

# JupyterLab on notebooks/ (docs/notebooks.md) with the venv's kernel; the notebooks start
# their own in-process Ray, with the fast path exported above. Jupyter refuses root unless told.
.PHONY: jupyter
jupyter: $(STAMP)
	cd notebooks && ../$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(JUPYTER_FLAGS)

# Prometheus for a running `make serve` (docs/monitoring.md#locally): finds Ray's metrics ports in the
# file-SD file Ray writes and evaluates the alert rules; UI on http://127.0.0.1:$(PROMETHEUS_PORT).
monitor: system-tools
	prometheus --config.file=configs/prometheus/prometheus.yml --storage.tsdb.path=.prometheus \
	  --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT)

# 10 minutes of load on a fresh server of the shipped config (started and stopped as make serve
# and make stop do, on free ports): errors, p99, RSS and open fds of every replica and HAProxy
# over time (goals: 0 errors, < 10 % RSS growth, flat fds); results in bench/results/soak.{json,png}.
# `make test` runs 30 s of it.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python -m serve_app.tools.train --store $(STORE) --if-missing
	$(BIN)/python bench/soak.py --start --duration $(SOAK_SECONDS)

# Our server against the minimal Serve app, careful FastAPI and MLServer with equal workers, in
# alternating rounds, plus the levers (docs/performance.md); ~50 min, results in
# bench/results/bench.{json,md,png}. BENCH_ARGS narrows a run, e.g. BENCH_ARGS=--quick.
BENCH_ARGS ?=
$(MLSERVER_VENV)/.installed: bench/mlserver-requirements.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV) || python3 -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --upgrade pip
	$(MLSERVER_VENV)/bin/pip install --quiet -r bench/mlserver-requirements.txt
	touch $@

bench: $(STAMP) $(MLSERVER_VENV)/.installed
	@command -v wrk >/dev/null && command -v h2load >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client)
	$(BIN)/python -m bench.harness $(BENCH_ARGS)

# The image's pinned, hash-checked dependencies (and the build backend): regenerate after
# editing pyproject.toml's dependencies. uv resolves against PyPI, for every platform.
LOCK := requirements/lock.txt
lock: $(STAMP)
	$(BIN)/pip install --quiet 'uv==0.13.8'
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(BIN)/uv pip compile --quiet pyproject.toml - --generate-hashes --universal --fork-strategy fewest \
	      --python-version 3.11 --custom-compile-command 'make lock' -o $(LOCK)

# The container image (docs/container.md), tagged <version>-ray<Ray pin>, with docker or podman.
# Behind a TLS-intercepting proxy, CA_BUNDLE (default: pip's own PIP_CERT) reaches pip as a
# build secret, never a layer. IMAGE_FLAGS adds build options (e.g. --build-arg BASE_IMAGE=...).
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/.*"ray\[serve\]==\([^"]*\)".*/\1/p' pyproject.toml)
IMAGE       ?= ghcr.io/serve-app/serve-app:$(VERSION)-ray$(RAY_VERSION)
CONTAINER_TOOL ?= $(shell command -v docker || command -v podman || echo docker)
CA_BUNDLE   ?= $(PIP_CERT)
IMAGE_FLAGS ?=
comma := ,
image:
	$(CONTAINER_TOOL) build -t $(IMAGE) \
	  $(if $(filter podman buildah,$(notdir $(CONTAINER_TOOL))),--format docker) \
	  $(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE)) $(IMAGE_FLAGS) .

clean:
	rm -rf $(VENV) model_store .pytest_cache .prometheus
