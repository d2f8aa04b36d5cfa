"""Serve scikit-learn and XGBoost models with Ray Serve."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from serve_app import publish`` without every replica importing pandas at start."""
    if name in ("publish", "PublishError"):
        from serve_app import publishing  # on first use: replicas never import pandas for it

        return getattr(publishing, name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
