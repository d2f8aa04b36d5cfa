"""Routes declared once on the ingress's methods, served two ways.

``@route("POST", "/v2/models/{name}/infer", ..., fast=True)`` marks a method of the ingress.
:func:`build_api` gives every marked method to a FastAPI app of its own, bound to one replica's
ingress (so ``self`` is never a parameter FastAPI sees): FastAPI keeps ``/docs``, the OpenAPI
schema, metadata and admin routes. :class:`FastPath` answers the routes marked ``fast`` (the
inference routes, nearly every request) itself and passes everything else to that FastAPI
app: FastAPI's middleware stack, route matching and dependency solving cost a replica more
CPU per one-row request than our whole request lifecycle (docs/performance.md#levers).
A fast route's handler runs exactly as under FastAPI: the same method, the same ``Request``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from serve_app.http import openapi_docs
from serve_app.lifecycle import RequestRefused
from serve_app.http.responses import error_response
from serve_app.metadata import ModelMetadata

logger = logging.getLogger("ray.serve")
ROUTE_ATTRIBUTE = "__serve_app_route__"


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    fast: bool
    options: dict[str, Any] = field(default_factory=dict)  # FastAPI's add_api_route options


def route(methods: str | tuple[str, ...], *paths: str, fast: bool = False, **options: Any) -> Callable:
    """Mark an ingress method as the handler of ``methods`` (one or several) on ``paths``;
    ``fast``: on the fast path."""
    def mark(fn: Callable) -> Callable:
        setattr(fn, ROUTE_ATTRIBUTE, Route((methods,) if isinstance(methods, str) else methods, paths, fast, options))
        return fn
    return mark


def declared_routes(server: object) -> list[tuple[Route, Callable]]:
    """Each marked method of ``server``'s class (base classes first, in declaration order),
    bound to ``server``."""
    found, seen = [], set()
    for klass in reversed(type(server).__mro__):
        for name, fn in vars(klass).items():
            spec = getattr(fn, ROUTE_ATTRIBUTE, None)
            if spec is not None and name not in seen:
                seen.add(name)
                found.append((spec, getattr(server, name)))
    return found


def build_api(server: object, *, docs_url: str | None = "/docs", redoc_url: str | None = "/redoc",
              documented_models: Callable[[], Mapping[str, ModelMetadata]] | None = None,
              **fastapi_options: Any) -> FastAPI:
    """A FastAPI app with every declared route of ``server``, and ``/docs`` (``/redoc``)
    served without internet access. ``/openapi.json`` offers an example request per model of
    ``documented_models()`` (by default: the models ``server``'s registry declares), asked
    when the schema is first requested (the models are loaded by then)."""
    api = FastAPI(docs_url=None, redoc_url=None, **fastapi_options)  # FastAPI's pages load a CDN
    for spec, handler in declared_routes(server):
        for path in spec.paths:
            for method in spec.methods:  # one route per method: OpenAPI operation ids stay unique
                api.add_api_route(path, handler, methods=[method], **spec.options)
    openapi_docs.complete_schema_lazily(api, documented_models or partial(openapi_docs.declared_models, server),
                                        partial(openapi_docs.requires_token, server))
    openapi_docs.serve_docs_pages(api, docs_url, redoc_url)
    return api


Handler = Callable[..., Awaitable[Response]]


class FastPath:
    """An ASGI app: the fast routes of ``server`` answered directly, the rest by ``fallback``.

    Serve adds its own exception handlers to the app it is given (``add_exception_handler``):
    they go to the FastAPI app, which serves every route that can raise past the lifecycle."""

    def __init__(self, server: object, fallback: FastAPI):
        self.fallback = fallback
        self._routes: dict[str, list[tuple[re.Pattern, Handler]]] = {}
        for spec, handler in declared_routes(server):
            if spec.fast:
                for path in spec.paths:
                    pattern, _, convertors = compile_path(path)
                    if any(c.regex != "[^/]+" for c in convertors.values()):
                        raise ValueError(f"fast route {path!r}: only plain {{name}} parameters")
                    for method in spec.methods:
                        self._routes.setdefault(method, []).append((pattern, handler))

    def add_exception_handler(self, exc_class: type[Exception], handler: Callable) -> None:
        self.fallback.add_exception_handler(exc_class, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            for pattern, handler in self._routes.get(scope["method"], ()):
                match = pattern.match(path)
                if match:
                    await _answer(handler, match.groupdict(), scope, receive, send)
                    return
        await self.fallback(scope, receive, send)


async def _answer(handler: Handler, params: dict[str, str], scope: Scope, receive: Receive, send: Send) -> None:
    try:
        response = await handler(request=Request(scope, receive), **params)
    except RequestRefused as refused:  # the lifecycle's own refusal (no valid token)
        response = refused.response
    except Exception:  # a handler's work runs inside the lifecycle: this is a bug before it began
        logger.exception("fast route %s %s failed", scope["method"], scope["path"])
        response = error_response(500, "internal error; see server logs")
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path below the application's route prefix, as Starlette's router matches it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
