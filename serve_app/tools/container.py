"""The container image's CMD: the shipped config served by the supervisor that ``make serve``
runs (serve_app/tools/supervisor.py), ports from the environment.

``make serve`` starts Ray with the dashboard on 127.0.0.1 and the metrics on a random port,
and serves on the config's fixed port. In a container the dashboard and metrics must
listen on all interfaces at known ports (the image EXPOSEs them), and two containers sharing
a network (``--network host``, the image test beside a ``make serve``) must not collide, so
each port can be moved with an environment variable:

    SERVE_PORT               Serve's HTTP port (default: the config's, 8000)
    SERVE_GRPC_PORT          Serve's gRPC port (default: the config's, 9000)
    RAY_DASHBOARD_PORT       Ray dashboard (default 8265)
    RAY_METRICS_EXPORT_PORT  Ray's Prometheus metrics (default 8080, KubeRay's)
    SERVE_CONFIG             the Serve config (default configs/serve_config.yaml)
    SERVE_DRAIN_S            on SIGTERM, how long Serve may shut the applications down
                             gracefully before Ray is stopped (default 5)

plus Ray's own ``RAY_SERVE_HAPROXY_STATS_PORT`` / ``RAY_SERVE_HAPROXY_METRICS_PORT`` and
``RAY_TMPDIR`` (Ray's temp dir is ``$RAY_TMPDIR/ray``, default /tmp/ray; the run file lies
beside it).

On SIGTERM (``docker stop``, the kubelet) Serve drains for up to SERVE_DRAIN_S, then every
process this command started is stopped, HAProxy included, and it exits 0. A KubeRay pod does
not use this: it runs ``ray start`` with its own command and deploys the RayService's
serveConfigV2.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import yaml

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
    # (SERVE_PORT) and its run file, multiprocessing's and joblib's temp dirs.
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


def main() -> None:
    # here: Ray is imported only to serve, not by the modules that read WRITABLE_PATHS
    from serve_app.tools.supervisor import Options, serve_forever

    tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp"))
    serve_forever(Options(
        config=config_for(os.environ), run_file=tmp / "serve-app-run.json", temp_dir=str(tmp / "ray"),
        # Reachable from outside the container: the node's own address, all interfaces.
        node_ip=None, dashboard_host="0.0.0.0",
        dashboard_port=int(os.environ.get("RAY_DASHBOARD_PORT", "8265")),
        metrics_export_port=int(os.environ.get("RAY_METRICS_EXPORT_PORT", "8080")),
        drain_s=float(os.environ.get("SERVE_DRAIN_S", "5"))))


if __name__ == "__main__":
    main()
