"""The Serve deployments besides the ingress (dedicated models, the multiplexed long tail), their
proxies, and reloads across replicas."""
