"""Metrics and input drift."""
