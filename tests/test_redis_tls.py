"""A managed Redis over TLS, as components/redis-external configures the head: a real Redis
(Debian's ``redis-server``) serving TLS only, with a certificate from a CA of the test's own, and
a real Ray head started the way KubeRay starts it for GCS fault tolerance (``RAY_REDIS_ADDRESS``
= the component's ``rediss://`` address form, the password as ``--redis-password``,
``RAY_external_storage_namespace``) with the CA the component mounts (``RAY_REDIS_CA_CERT``).

The GCS must write its tables into that Redis under the namespace; without the CA it must refuse
the server's certificate rather than talk in the clear or unverified.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import BIN, free_port, require_tool
from local_cluster import RedisServer, gcs_fault_tolerance_env, redis_server
from serve_app.tools.localserve import stop_ray_cluster

PASSWORD = "tls-test-password"
NAMESPACE = "serve-app-tls-test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    require_tool("openssl")
    work = tmp_path_factory.mktemp("redis-tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=serve-app test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=work)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
             "-out", "server.csr", cwd=work)
    (work / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "san.ext", "-out", "server.crt", cwd=work)
    with redis_server(work, PASSWORD, tls_dir=work) as redis:
        yield redis


def _start_head(redis: RedisServer, ca: Path | None) -> tuple[subprocess.CompletedProcess, Path]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-tls-", dir="/tmp"))
    head_env, _ = gcs_fault_tolerance_env(redis, NAMESPACE)
    env = {**os.environ, **head_env, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_REDIS_CA_CERT", None)
    if ca is not None:
        env["RAY_REDIS_CA_CERT"] = str(ca)
    result = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=0", "--include-dashboard=false", f"--dashboard-port={free_port()}", f"--temp-dir={temp_dir}", "--redis-password", PASSWORD,
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    return result, temp_dir


def test_the_gcs_keeps_its_state_in_a_tls_redis_verified_by_the_mounted_ca(tls_redis):
    result, temp_dir = _start_head(tls_redis, tls_redis.ca)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert tls_redis.keys(f"*{NAMESPACE}*"), "the GCS wrote nothing under its storage namespace"
    finally:
        stop_ray_cluster(temp_dir)


def test_without_the_ca_the_gcs_refuses_the_servers_certificate(tls_redis):
    result, temp_dir = _start_head(tls_redis, None)
    try:
        assert result.returncode != 0, "the head started against a Redis whose certificate it cannot verify"
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr, result.stderr[:3000]
    finally:
        stop_ray_cluster(temp_dir)
