"""HTTP: the ingress routes, the HTTP side of the request lifecycle, bodies and responses."""
