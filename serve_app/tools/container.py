"""The container image's CMD: ``serve run`` on the shipped config, ports from the environment.

A plain ``serve run`` starts Ray with the dashboard on 127.0.0.1 and the metrics on a random
port, and serves on the config's fixed port. In a container the dashboard and metrics must
listen on all interfaces at known ports (the image EXPOSEs them), and two containers sharing
a network (``--network host``, the image test beside a ``make serve``) must not collide, so
each port can be moved with an environment variable:

    SERVE_PORT               Serve's HTTP port (default: the config's, 8000)
    SERVE_GRPC_PORT          Serve's gRPC port (default: the config's, 9000)
    RAY_DASHBOARD_PORT       Ray dashboard (default 8265)
    RAY_METRICS_EXPORT_PORT  Ray's Prometheus metrics (default 8080, KubeRay's)
    SERVE_CONFIG             the Serve config (default configs/serve_config.yaml)

plus Ray's own ``RAY_SERVE_HAPROXY_STATS_PORT`` / ``RAY_SERVE_HAPROXY_METRICS_PORT``.

SIGTERM (``docker stop``, the kubelet) is handled as Ctrl-C is by ``serve run``: the
applications are deleted, then Ray's processes, which this command started, shut down with
it. A KubeRay pod does not use this: it runs ``ray start`` with its own command and deploys
the RayService's serveConfigV2.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Mapping

import ray
import yaml
from ray.serve.scripts import cli

DEFAULT_CONFIG = "configs/serve_config.yaml"

# The only paths the image writes at run time. Everything else (/opt/venv, the app and its
# baked model store in /home/ray/app, /etc, /run, ...) can be a read-only root file system
# (Kubernetes' readOnlyRootFilesystem, ``docker run --read-only``) with these as emptyDir or
# tmpfs volumes. Found by running the image read-only (tests/test_image.py runs the CMD that
# way, with exactly these writable), not by reading Ray's source; /dev/shm, Ray's object
# store, is a mount of its own under every runtime (KubeRay adds an emptyDir there).
WRITABLE_PATHS = (
    # Ray's temp root: the session dir (logs, sockets, runtime_env files, metrics discovery),
    # /tmp/ray/ray_current_cluster, the object store's fallback files, HAProxy's config, admin
    # socket and logs (/tmp/haproxy-serve), this command's moved copy of the Serve config
    # (SERVE_PORT), multiprocessing's and joblib's temp dirs.
    "/tmp",
    # Ray's token authentication: ray.init() (this CMD) generates ~/.ray/auth_token when Ray
    # is given no token (no RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and it fails at start if it
    # cannot write it. KubeRay pods get RAY_AUTH_TOKEN from the Secret and do not write it
    # (a head's `ray start` + `serve deploy` served read-only with only /tmp writable); the
    # path is listed once for both, so the image needs the same volumes however it starts.
    "/home/ray/.ray",
)


def config_for(env: Mapping[str, str]) -> str:
    """Path of the config to run: the shipped one, or a copy on SERVE_PORT (HTTP) and
    SERVE_GRPC_PORT (gRPC) when either is set."""
    path = env.get("SERVE_CONFIG", DEFAULT_CONFIG)
    port, grpc_port = env.get("SERVE_PORT"), env.get("SERVE_GRPC_PORT")
    if not port and not grpc_port:
        return path
    with open(path) as f:
        config = yaml.safe_load(f)
    if port:
        config.setdefault("http_options", {})["port"] = int(port)
    if grpc_port:
        config.setdefault("grpc_options", {})["port"] = int(grpc_port)
    with tempfile.NamedTemporaryFile(
            "w", prefix="serve_config-", suffix=".yaml", delete=False) as out:
        yaml.safe_dump(config, out, sort_keys=False)
    return out.name


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    path = config_for(os.environ)
    # `serve run` calls ray.init() only when Ray is not initialised yet: start it here with
    # the dashboard and metrics reachable from outside the container.
    ray.init(
        namespace="serve",
        include_dashboard=True,
        dashboard_host="0.0.0.0",
        dashboard_port=int(os.environ.get("RAY_DASHBOARD_PORT", "8265")),
        _metrics_export_port=int(os.environ.get("RAY_METRICS_EXPORT_PORT", "8080")),
    )
    signal.signal(signal.SIGTERM, _interrupt)
    cli.main(["run", path], prog_name="serve")


if __name__ == "__main__":
    main()
