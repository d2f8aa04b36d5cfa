"""Framework runtimes. Importing this package registers every runtime it ships."""

from serve_app.runtimes import sklearn as _sklearn  # noqa: F401  (registers "sklearn")
from serve_app.runtimes import xgboost as _xgboost  # noqa: F401  (registers "xgboost")
from serve_app.runtimes.base import (
    RUNTIMES,
    ArtifactError,
    ModelRuntime,
    UnsupportedOutput,
    register_runtime,
    runtime_for,
)

__all__ = [
    "RUNTIMES",
    "ArtifactError",
    "ModelRuntime",
    "UnsupportedOutput",
    "register_runtime",
    "runtime_for",
]


def load_runtime(store, name: str, version: str | None = None) -> ModelRuntime:
    """Read metadata, verify the artifact's sha256, and hand the bytes to its runtime."""
    metadata = store.read_metadata(name, version)
    return runtime_for(metadata.framework).load(store.read_artifact(metadata), metadata)


def check_loadable(store, metadata) -> None:
    """What every load checks before deserialising, without deserialising: the artifact is
    readable, has its recorded sha256, and its runtime's policy accepts it (trusted types).
    ModelStoreError or ArtifactError otherwise."""
    runtime_for(metadata.framework).check(store.read_artifact(metadata), metadata)


def accepts_missing(metadata) -> bool:
    """Whether the runtime of a stored model takes null/NaN inputs (known without loading it)."""
    return runtime_for(metadata.framework).accepts_missing


__all__ += ["load_runtime", "check_loadable", "accepts_missing"]
