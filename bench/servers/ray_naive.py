"""The naive Ray Serve reference: one deployment per model written the way Ray's getting-started
tutorials do (``__call__`` takes the Starlette request, ``await request.json()``, model called
inline), with Serve's defaults everywhere: one replica, no batching, Ray's default HTTP proxy.

    serve run bench.servers.ray_naive:app model_dir=/path/to/export

Loads the same exported artifacts as the FastAPI baseline; route ``/<model>`` takes
``{"instances": [[...], ...]}`` and answers ``{"predictions": [...]}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import serve
from starlette.requests import Request

from bench.model_export import load_exported


@serve.deployment
class Model:
    def __init__(self, path: str):
        self.model = load_exported(Path(path))

    async def __call__(self, request: Request) -> dict:
        payload = await request.json()
        return {"predictions": self.model.predict(np.array(payload["instances"])).tolist()}


def app(args: dict[str, str]) -> serve.Application:
    """One application per model (``serve run`` config: ``args: {model_dir: ..., model: ...}``)."""
    return Model.bind(str(Path(args["model_dir"]) / args["model"]))
