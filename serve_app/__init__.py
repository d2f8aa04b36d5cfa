"""Serve scikit-learn and XGBoost models with Ray Serve."""

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use: replicas never import pandas,
# pyarrow or Ray Data for these.
_LAZY = {"publish": "publishing", "PublishError": "publishing", "score": "scoring"}


def __getattr__(name: str):
    """``from serve_app import publish, score`` without every replica importing their libraries at start."""
    if name in _LAZY:
        import importlib  # here: the package's import stays as light as it was

        return getattr(importlib.import_module(f"serve_app.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
