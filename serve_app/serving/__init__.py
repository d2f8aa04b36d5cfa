"""Serving: the model interface, the registry of served models, versions and their split, and the
in-process worker. Plain Python: no HTTP, no Serve deployments."""
