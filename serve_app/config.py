"""The application's arguments: the ``args`` block of an application in a Ray Serve config.

Deployment-level knobs (replicas, ``autoscaling_config``, ``max_ongoing_requests``,
``ray_actor_options``) stay where Ray Serve puts them, in the config's ``deployments`` list,
keyed by deployment name: ``ModelServer`` for the HTTP ingress (which hosts the in-process
models) and ``model-<name>`` for each model declared ``dedicated: true``.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.store import DEFAULT_STORE, check_segment, store_from_environment


class DriftSpec(BaseModel):
    """Input-drift monitoring of one model (PSI over a sliding window; see serve_app.drift)."""

    model_config = ConfigDict(extra="forbid")

    window_rows: int = Field(1000, ge=0, description="recent input rows kept per replica; 0 turns drift off")
    min_rows: int = Field(200, ge=1, description="no PSI is reported before the window holds this many rows")
    interval_s: float = Field(10.0, gt=0, description="seconds between PSI computations")


class AccessLogSpec(BaseModel):
    """Which requests get an access line in the replica's JSON log.

    Serve's own access log formats and writes a JSON record for every request, which costs a
    large share of single-row throughput (docs/performance.md measures it). This log keeps the
    lines worth reading:
    every error, every slow request, every request its client marked as a sampled trace (W3C
    ``traceparent`` with the sampled flag: someone will look it up), and a sample of the rest.
    Metrics count every request. (A client's own X-Request-ID cannot mark a request: HAProxy
    gives every request one before the replica sees it.)
    """

    model_config = ConfigDict(extra="forbid")

    sample_rate: float = Field(0.01, ge=0, le=1, description="share of the other successful requests logged")
    slow_ms: float = Field(250.0, ge=0, description="requests at least this slow are always logged")
    sampled_traces: bool = Field(
        True, description="always log a request whose W3C traceparent has the sampled flag")

    def wants(self, status: int, seconds: float, sampled_trace: bool, draw: float) -> bool:
        """Whether a finished request gets an access line; ``draw`` is uniform in [0, 1)."""
        return (status >= 400 or seconds * 1000 >= self.slow_ms or draw < self.sample_rate
                or (sampled_trace and self.sampled_traces))


class AdmissionSpec(BaseModel):
    """How much work one ingress replica takes on at once, how long the rest may wait for it,
    and when a refusal is sent.

    At most ``max_requests`` model and metadata requests (any transport) are under way in a
    replica; the next ones wait for a slot, the newest first, for at most ``max_wait_s``; one
    that got none is refused ``refuse_after_s`` after its arrival with 503
    ``{"reason": "overloaded"}`` and ``Retry-After`` (gRPC: UNAVAILABLE), counted as
    ``outcome="shed"`` (serve_app.lifecycle says why in this order and at that time). However
    many clients come, an accepted request answers within ``max_wait_s`` plus its own time,
    where an unbounded queue makes everyone wait longer with every client added (sizing:
    docs/configuration.md#overload). Health probes never wait.
    """

    model_config = ConfigDict(extra="forbid")

    max_requests: int = Field(32, ge=1, description="requests one ingress replica works on at once")
    max_wait_s: float = Field(0.5, ge=0, description="how long a request beyond them may wait for a slot")
    refuse_after_s: float = Field(3.0, ge=0, description="when a request that got no slot is refused with 503, "
                                  "counted from its arrival")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of a refused request (gRPC: grpc-retry-pushback-ms)")


class ModelSpec(BaseModel):
    """One served model and how its requests are batched."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = Field("latest", description='a version in the store, or "latest"')
    max_batch_size: int = Field(32, ge=1, description="rows per model call, at most")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a batch waits to fill before it runs; 0: a batch is "
        "whatever queued while the model was busy (no wait at low load, full batches at high load)"
    )
    dedicated: bool = Field(
        False, description="serve from a deployment of its own (model-<name>) behind a handle"
    )
    inline_below_ms: float = Field(
        1.0, ge=0, description="a model call of at most max_batch_size rows runs on the replica's event "
        "loop while this model's calls average less than this; longer ones (and 0: all) run on the "
        "model's own thread"
    )
    drift: DriftSpec = Field(default_factory=DriftSpec)
    timeout_s: float = Field(
        30.0, gt=0, description="a request waiting longer than this for the model gets 504"
    )
    versions: list[str] = Field(
        default_factory=list, description="more versions kept live beside `version`, each addressable "
        "at .../versions/<v>/...; versions named in `traffic` and `shadow` are live too")
    traffic: dict[str, float] = Field(
        default_factory=dict, description="weighted split of unversioned requests between live versions, "
        "in percent (summing to 100), e.g. {'1': 90, '2': 10}; sticky per X-Request-ID. Empty: all "
        "unversioned requests go to `version`")
    shadow: str | None = Field(
        None, description="a version that also gets every unversioned request; its answers are "
        "compared with the served ones, counted and discarded")
    max_model_bytes: int | None = Field(
        None, ge=1, description="a version whose stored artifact is larger is not loaded (the deployment "
        "fails at start); default: the application's max_model_bytes")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_segment("name", value)

    @field_validator("version", "shadow", mode="before")
    @classmethod
    def _version(cls, value) -> str | None:
        return None if value is None else check_segment("version", str(value))

    @field_validator("versions", mode="before")
    @classmethod
    def _versions(cls, value) -> list[str]:
        if value is not None and not isinstance(value, (list, tuple)):
            raise ValueError(f"versions: a list of versions, not {value!r}")
        return [check_segment("version", str(v)) for v in value or ()]

    @field_validator("traffic", mode="before")
    @classmethod
    def _traffic(cls, value) -> dict[str, float]:
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"traffic: a mapping of version to percent, not {value!r}")
        return {check_segment("version", str(k)): v for k, v in (value or {}).items()}

    @model_validator(mode="after")
    def _split_adds_up(self) -> "ModelSpec":
        if self.traffic:
            if any(w < 0 for w in self.traffic.values()):
                raise ValueError(f"model {self.name!r}: traffic weights must not be negative")
            if abs(sum(self.traffic.values()) - 100) > 1e-6:
                raise ValueError(f"model {self.name!r}: traffic weights sum to {sum(self.traffic.values())}, not 100")
        if self.shadow is not None and self.shadow in self.traffic:
            raise ValueError(f"model {self.name!r}: version {self.shadow!r} cannot both take traffic and shadow it")
        return self

    @property
    def live_versions(self) -> list[str]:
        """Every version label this model keeps loaded: the default first, then the rest."""
        return list(dict.fromkeys([self.version, *self.versions, *self.traffic,
                                   *([self.shadow] if self.shadow else [])]))

    @property
    def routing(self) -> tuple:
        """What decides which versions are loaded and which answers (what ``for_version``
        clears): a change of these opens the model again, any other applies to loaded workers."""
        return self.version, self.versions, self.traffic, self.shadow

    def for_version(self, version: str) -> "ModelSpec":
        """The same settings for one of the live versions (what a worker loads)."""
        return self.model_copy(update={"version": version, "versions": [], "traffic": {}, "shadow": None})

    @property
    def deployment_name(self) -> str:
        return f"model-{self.name}"


class MultiplexSpec(BaseModel):
    """The long tail: models served by one shared deployment (``multiplexed-models``) with Serve
    model multiplexing. Each replica keeps at most ``max_models_per_replica`` models loaded
    (least recently used evicted) and Serve routes a model's requests to replicas that have it.
    Costs a DeploymentHandle hop and a load on a cold model; saves a deployment per model."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=lambda: ["*"], description='names served this way; "*": every model in the store '
        "that `models` does not declare")
    max_models_per_replica: int = Field(8, ge=1, description="loaded models per replica before LRU eviction")
    max_batch_size: int = Field(32, ge=1, description="rows per model call, at most (each model)")
    timeout_s: float = Field(30.0, gt=0, description="a request waiting longer (a cold load included) gets 504")
    max_model_bytes: int | None = Field(
        None, ge=1, description="a long-tail model whose stored artifact is larger is refused (409 "
        "model_too_large) and never loaded; default: the application's max_model_bytes")

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, value) -> list[str]:
        return [v if v == "*" else check_segment("name", v) for v in value or ()]

    def serves(self, name: str) -> bool:
        return "*" in self.models or name in self.models

    def spec_for(self, name: str, version: str) -> "ModelSpec":
        return ModelSpec(name=name, version=version, max_batch_size=self.max_batch_size, timeout_s=self.timeout_s,
                         max_model_bytes=self.max_model_bytes)


MULTIPLEXED_DEPLOYMENT = "multiplexed-models"
INGRESS_DEPLOYMENT = "ModelServer"  # the HTTP and gRPC ingress, which hosts the in-process models
IMPORT_PATH = "serve_app.app:build_app"  # every Serve config's import_path for this package
# Stored artifact bytes; a loaded model takes about as much memory, more while it loads
# (docs/many-models.md#memory-of-the-long-tail).
DEFAULT_MAX_MODEL_BYTES = 256 * 2**20


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = Field(DEFAULT_STORE, description="model store: a local path or s3://bucket/prefix")
    train_if_missing: bool = Field(
        True, description="train the bundled demo models the store lacks before serving"
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="request bodies above this get 413"
    )
    max_model_bytes: int = Field(
        DEFAULT_MAX_MODEL_BYTES, ge=1, description="no model whose stored artifact is larger is loaded: a "
        "declared one fails the deployment at start, a long-tail one answers 409 model_too_large; "
        "models[].max_model_bytes and multiplexed.max_model_bytes override it")
    models: list[ModelSpec] = Field(min_length=1)
    access_log: AccessLogSpec = Field(default_factory=AccessLogSpec)
    admission: AdmissionSpec = Field(default_factory=AdmissionSpec)
    multiplexed: MultiplexSpec | None = Field(
        None, description="serve the long tail of the store through Serve model multiplexing")
    invocations_model: str | None = Field(
        None, description="the model MLflow's POST /invocations answers with (per-model: "
                          "/v1/models/{name}/invocations); default: the first of `models`")
    fast_path: bool = Field(
        True, description="answer the inference routes without FastAPI's routing (serve_app/http/routes.py); "
                          "false sends every route through FastAPI")

    @model_validator(mode="before")
    @classmethod
    def _store_from_environment(cls, data):
        """``SERVE_APP_STORE`` wins over the config's ``store`` (see serve_app.store.STORE_ENV)."""
        override = store_from_environment()
        if override and isinstance(data, dict):
            return {**data, "store": override}
        return data

    @field_validator("store")
    @classmethod
    def _absolute_store(cls, value: str) -> str:
        """Replicas do not share the caller's working directory: pin local paths."""
        if value.startswith("s3://"):
            return value
        return os.path.abspath(os.path.expanduser(value.removeprefix("file://")))

    @model_validator(mode="after")
    def _bound_every_model(self) -> "AppConfig":
        """``max_model_bytes`` bounds each model that does not set a bound of its own."""
        bound = {"max_model_bytes": self.max_model_bytes}
        self.models = [m if m.max_model_bytes else m.model_copy(update=bound) for m in self.models]
        if self.multiplexed is not None and self.multiplexed.max_model_bytes is None:
            self.multiplexed = self.multiplexed.model_copy(update=bound)
        return self

    @property
    def default_invocations_model(self) -> str:
        return self.invocations_model or self.models[0].name

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models declared twice: {dupes}")
        return models


# What a rollout may change of a declared model: what it serves and how it batches.
ROLLOUT_FIELDS = frozenset({"version", "versions", "traffic", "shadow", "max_batch_size", "batch_wait_timeout_s",
                            "inline_below_ms", "drift", "timeout_s"})


class Rollout(BaseModel):
    """The ingress's ``user_config`` (``ModelServer`` in the config's ``deployments``): per
    in-process model of ``args.models``, serving fields that replace the declared ones.

    Why beside ``args``: Serve rebuilds the whole application when ``args`` change (every
    replica restarts, and while the build runs each node's HAProxy has only the head's fallback
    proxy), but applies a changed ``user_config`` to the running replicas (``reconfigure``).
    So a version rollout, a canary split or a batching change made here reaches clients with no
    restart and no detour (docs/configuration.md#rollouts).
    """

    model_config = ConfigDict(extra="forbid")

    models: dict[str, dict] = Field(
        default_factory=dict, description="model name -> the fields to serve it by, of "
        f"{sorted(ROLLOUT_FIELDS)}, e.g. {{'iris': {{'version': '2'}}}}")

    def specs(self, config: AppConfig) -> list[ModelSpec]:
        """``config.models`` with these fields in; ValueError naming what cannot be applied."""
        declared = {spec.name: spec for spec in config.models}
        for name, fields in self.models.items():
            spec = declared.get(name)
            if spec is None:
                raise ValueError(f"user_config: model {name!r} is not in args.models {sorted(declared)}")
            if spec.dedicated:
                raise ValueError(f"user_config: model {name!r} is dedicated: its versions are its deployment's "
                                 "(change them in args)")
            unknown = sorted(set(fields) - ROLLOUT_FIELDS)
            if unknown:
                raise ValueError(f"user_config: model {name!r}: {unknown} cannot change without a restart; "
                                 f"these can: {sorted(ROLLOUT_FIELDS)}")
            declared[name] = ModelSpec.model_validate({**spec.model_dump(), **fields})
        return list(declared.values())


class ServeConfigError(ValueError):
    """A Serve config this package's replicas would not apply."""


def check_serve_config(document: dict) -> None:
    """ServeConfigError naming the application whose ``args`` or ingress ``user_config`` this
    package would not apply. A replica logs a ``user_config`` it cannot apply and keeps serving
    (:meth:`ModelServer.reconfigure`), so ``make manifests`` checks it before it ships."""
    for app in document.get("applications") or []:
        if app.get("import_path") != IMPORT_PATH:
            continue
        try:
            config = AppConfig.model_validate(app.get("args") or {})
            for deployment in app.get("deployments") or []:
                if deployment.get("name") == INGRESS_DEPLOYMENT and deployment.get("user_config") is not None:
                    Rollout.model_validate(deployment["user_config"]).specs(config)
        except ValueError as exc:
            raise ServeConfigError(f"application {app.get('name')!r}: {exc}") from None
