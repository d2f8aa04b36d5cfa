"""Optional bearer-token authentication of the data plane.

Off unless a token is configured in the replica's environment: ``SERVE_APP_API_TOKEN`` (the
token itself) or ``SERVE_APP_API_TOKEN_FILE`` (a file holding it, e.g. a mounted Kubernetes
Secret). When on, every model and metadata endpoint wants ``Authorization: Bearer <token>``;
the health endpoints stay open so probes and load balancers need no secret. Tokens are
compared in constant time (``hmac.compare_digest``), so response timing does not leak how
much of a guess was right.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_ENV = "SERVE_APP_API_TOKEN"
TOKEN_FILE_ENV = "SERVE_APP_API_TOKEN_FILE"


def configured_token() -> bytes | None:
    """The data-plane token from the environment, or None when authentication is off."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if not token and path:
        token = Path(path).read_text().strip()
    return token.encode() if token else None


def authorized(authorization: str | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value carries ``token`` as a bearer token."""
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    return hmac.compare_digest(presented.strip().encode(), token)
