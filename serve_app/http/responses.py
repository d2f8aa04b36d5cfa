"""The response bodies every route sends: JSON (orjson, numpy arrays as they are), errors in
one shape, and V2 answers with binary outputs."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from serve_app.codecs import binary


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
                    status_code=status_code, media_type="application/json")


def error_response(status_code: int, message: str, reason: str | None = None,
                   retry_after_s: int | None = None) -> Response:
    """``{"error": ..., "reason": ...}``: every refused or failed request looks like this;
    ``retry_after_s``: when the client may try again (``Retry-After``)."""
    body = {"error": message} if reason is None else {"error": message, "reason": reason}
    response = json_response(body, status_code)
    if status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="serve-app"'
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(retry_after_s)
    return response


def v2_response(content: dict[str, Any], binary_outputs: set[str]) -> Response:
    """A V2 inference answer: JSON, or with ``binary_outputs`` as raw bytes behind the JSON
    (the binary tensor extension)."""
    if not binary_outputs:
        return json_response(content)
    body, header_length = binary.encode_response(content, binary_outputs)
    return Response(body, media_type="application/octet-stream",
                    headers={binary.HEADER_LENGTH: str(header_length)})
