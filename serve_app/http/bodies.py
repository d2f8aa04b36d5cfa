"""Request bodies as the transport delivers them: size limit, content types, JSON, and the
binary V2 formats handed to their codec."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from serve_app.codecs import binary
from serve_app.errors import BadInput, PayloadTooLarge, UnsupportedMediaType


def content_type(request: Request) -> str:
    """The media type without parameters; a missing header means JSON."""
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def read(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it exceeds ``limit`` bytes, declared or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no size: stop at the limit
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:
    media_type = content_type(request)
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type {media_type!r} is not supported; send application/json")
    body = await read(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"malformed JSON: {exc}", "malformed_json") from None


async def v2_body(request: Request, limit: int) -> tuple[Any, set[str]]:
    """A V2 request object from JSON or a binary body, and the outputs to send back binary."""
    header_length = request.headers.get(binary.HEADER_LENGTH)
    media_type = content_type(request)
    if not binary.is_binary(media_type, header_length):
        return await json_body(request, limit), set()
    body = binary.decode_body(await read(request, limit), media_type, header_length,
                              request.query_params.get("outputs"))
    return body, binary.binary_outputs(body)
