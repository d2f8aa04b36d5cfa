"""Which live version answers an unversioned request: the weighted canary split.

A request that carries an id (``X-Request-ID``) is hashed into one of 10,000 buckets, so the
same id always lands on the same version while the weights stay the same: a client that
retries, or tags a session's requests with one id, sees one model. Without an id a bucket is
drawn at random. The split is a pure function of the config and the key: every ingress replica
routes a given id the same way.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Mapping

BUCKETS = 10_000


def bucket_of(key: str | None) -> int:
    """A stable bucket in [0, BUCKETS) for ``key``; a random one when there is no key."""
    if not key:
        return random.randrange(BUCKETS)
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class TrafficSplit:
    """Versions and their share of unversioned traffic (percent, summing to 100)."""

    def __init__(self, weights: Mapping[str, float]):
        self.weights = {v: float(w) for v, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError("a traffic split needs at least one version with a positive weight")
        self.versions = list(self.weights)
        total = sum(self.weights.values())
        # Cumulative bucket bounds: version i owns [bounds[i-1], bounds[i]).
        running, self._bounds = 0.0, []
        for version in self.versions:
            running += self.weights[version]
            self._bounds.append(round(running / total * BUCKETS))
        self._bounds[-1] = BUCKETS

    def choose(self, key: str | None) -> str:
        return self.versions[bisect.bisect_right(self._bounds, bucket_of(key))]
