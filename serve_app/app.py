"""The Serve application: ``build_app(args)`` is the ``import_path`` target of every Serve
config (``serve_app.app:build_app``).

It binds the HTTP ingress (``ModelServer``, which hosts the in-process models), one
``model-<name>`` deployment per model declared ``dedicated: true``, and the
``multiplexed-models`` deployment when the long tail is on.
"""

from __future__ import annotations

from ray import serve

from serve_app.config import MULTIPLEXED_DEPLOYMENT, AppConfig
from serve_app.deployments.dedicated import DedicatedModel
from serve_app.deployments.multiplexed import MultiplexedModels
from serve_app.http.ingress import ModelServer
from serve_app.store import ModelStore
from serve_app.tools.train import demo_names, ensure_models


def build_app(args: dict) -> serve.Application:
    """The Serve application for ``args`` (see :class:`serve_app.config.AppConfig`)."""
    config = AppConfig.model_validate(args)
    if config.train_if_missing:
        ensure_models(ModelStore(config.store), [m.name for m in config.models if m.name in demo_names()])
    dedicated = {
        spec.name: DedicatedModel.options(name=spec.deployment_name).bind(config.store, spec)
        for spec in config.models
        if spec.dedicated
    }
    multiplexed = (MultiplexedModels.options(name=MULTIPLEXED_DEPLOYMENT).bind(config.store, config.multiplexed)
                   if config.multiplexed else None)
    return ModelServer.bind(config.model_dump(), dedicated, multiplexed)
