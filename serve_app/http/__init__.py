"""HTTP: the ingress routes, the request lifecycle, bodies, responses and auth."""
