"""Serve scikit-learn and XGBoost models with Ray Serve."""

__version__ = "0.1.0"
