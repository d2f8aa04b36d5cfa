"""What this application's deployments share: how they are declared, and how the ingress
awaits a call to one of them.
"""

from __future__ import annotations

from typing import Any, Awaitable

from ray.exceptions import RayTaskError

from serve_app.errors import InferenceError

# max_ongoing_requests: what a replica takes before Serve queues elsewhere (the configs set it
# per deployment too). max_surge_percent: a rolling update starts a new replica before it stops
# an old one, so a one-replica deployment is never empty mid-rollout (requests would queue for
# the seconds a replica takes to start).
DEPLOYMENT_OPTIONS = {"max_ongoing_requests": 64, "max_surge_percent": 25}


async def remote_call(call: Awaitable[Any]) -> Any:
    """Await a handle call; a client error raised in the replica leaves as itself (Ray wraps
    it, which would hide its status and reason and turn a 4xx into a 500)."""
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, InferenceError):
            raise exc.cause from None
        raise
