"""An HTTP request as the request lifecycle (:mod:`serve_app.lifecycle`) sees it: its headers,
and JSON answers with ``X-Model-Version``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serve_app.http.responses import error_response, json_response


class HttpCall:
    """One HTTP request (the lifecycle's ``Call``)."""

    def __init__(self, request: Request):
        self._request = request

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def path(self) -> str:  # read only for an access line: building the URL costs microseconds
        return self._request.url.path

    def header(self, name: str) -> str | None:
        return self._request.headers.get(name)

    def status(self, reply: Any) -> int:
        return reply.status_code if isinstance(reply, Response) else 200

    def success(self, reply: Any, version: str | None) -> Response:
        """A Response as the route built it, or content as JSON."""
        response = reply if isinstance(reply, Response) else json_response(reply)
        if version is not None:
            response.headers["X-Model-Version"] = version  # which version answered (canary, shadow)
        return response

    def failure(self, status: int, message: str, reason: str | None, retry_after_s: int | None = None) -> Response:
        return error_response(status, message, reason, retry_after_s)
