"""Project tools: the command line, training the demo models, manifests, the container entry
point, and running Serve locally for tests and benchmarks."""
