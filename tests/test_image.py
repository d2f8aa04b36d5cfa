"""The container image, built with ``make image`` and run for real (marker ``image``).

No Docker engine or registry is needed: a Debian bookworm + Python 3.11 base is made with
debootstrap (kept as a local image, tagged by its recipe, so later runs reuse it) and passed
as BASE_IMAGE to ``make image`` driving buildah. The image then runs its own CMD (read from
the image config) on the host network with every port moved to a free one and its root file
system read-only but for WRITABLE_PATHS (``read_only``: a Kubernetes pod's
readOnlyRootFilesystem with emptyDirs), answers V1 and V2 requests and its HEALTHCHECK, and
stops on SIGTERM as it would under ``docker stop``, leaving no process behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import tomllib
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import ROOT, free_port, require_tool
from serve_app.tools.container import WRITABLE_PATHS
from serve_app.tools.localserve import wait_ready

TEST_IMAGE = "localhost/serve-app-test:latest"
# The base, as the official python:3.11-slim-bookworm is: Debian 12, Python 3.11, venv, CAs.
DEBOOTSTRAP_ARGS = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    "bookworm"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_IMAGE = ("localhost/serve-app-test-base:bookworm-py311-"
              + hashlib.sha256(" ".join(DEBOOTSTRAP_ARGS).encode()).hexdigest()[:12])
# The CA bundle pip needs behind this machine's TLS-intercepting proxy (a build secret).
CA_BUNDLE = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]  # a setosa (0), a virginica (2)
MALIGNANT = [17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
             1.095, 0.9053, 8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003,
             0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601,
             0.1189]  # sample 0 of scikit-learn's breast-cancer set: malignant (0)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def image_exists(buildah: str, ref: str) -> bool:
    return subprocess.run([buildah, "inspect", "--type", "image", ref],
                          capture_output=True).returncode == 0


def mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(root)]


@pytest.fixture(scope="session")
def base_image(tmp_path_factory) -> str:
    """A bookworm + Python 3.11 base image, built once per recipe and reused after that."""
    buildah = require_tool("buildah")
    if image_exists(buildah, BASE_IMAGE):
        return BASE_IMAGE
    debootstrap, podman = require_tool("debootstrap"), require_tool("podman")
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    run(debootstrap, *DEBOOTSTRAP_ARGS, str(rootfs), DEBIAN_MIRROR)
    # As in the official images: no package caches or lists (the Dockerfile runs apt-get update).
    for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"),
                     *rootfs.glob("var/lib/apt/lists/*")]:
        if leftover.is_file():
            leftover.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(podman, "import", "-", BASE_IMAGE, stdin=tar.stdout)
    assert tar.wait() == 0
    if not mounts_under(rootfs):  # never delete through a /proc or /dev left mounted inside
        run("rm", "-rf", "--one-file-system", str(rootfs))
    return BASE_IMAGE


@pytest.fixture(scope="session")
def image(base_image, tmp_path_factory) -> dict:
    """``make image`` with buildah on the debootstrap base; the built image's config."""
    buildah = require_tool("buildah")
    log = tmp_path_factory.mktemp("image") / "build.log"
    flags = f"--layers --isolation chroot --network host --build-arg BASE_IMAGE={base_image}"
    with open(log, "w") as out:
        build = subprocess.run(
            ["make", "--no-print-directory", "image", f"IMAGE={TEST_IMAGE}",
             f"CONTAINER_TOOL={buildah}", f"CA_BUNDLE={CA_BUNDLE}", f"IMAGE_FLAGS={flags}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    assert build.returncode == 0, log.read_text()[-5000:]
    inspect = json.loads(run(buildah, "inspect", "--type", "image", TEST_IMAGE).stdout)
    return inspect["Docker"]["config"]


@pytest.fixture(scope="module")
def container(image):
    """A working container of the image: its name and its root filesystem, mounted."""
    buildah = require_tool("buildah")
    name = f"serve-app-test-{os.getpid()}"
    # Docker gives containers ~1M open files; Ray's HAProxy asks for ~10k. 64 MiB of /dev/shm
    # (the default) is too small for Ray's object store.
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    run(buildah, "from", "--name", name, f"--ulimit=nofile={nofile}:{nofile}",
        "--shm-size=1g", TEST_IMAGE)
    try:
        yield name, Path(run(buildah, "mount", name).stdout.strip())
    finally:
        subprocess.run([buildah, "rm", name], capture_output=True)


def in_container(name: str, command: str, env: dict[str, str] | None = None) -> str:
    """Output of ``bash -c command`` in the container, as a KubeRay probe runs it (no login)."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return run("buildah", "run", "--isolation", "chroot", "--network", "host", *flags, name,
               "--", "bash", "-c", command).stdout


def read_only(root: Path, image: dict, command: list[str], env: dict[str, str] | None = None,
              writable: tuple[str, ...] = WRITABLE_PATHS) -> list[str]:
    """argv running ``command`` in the container as a pod with readOnlyRootFilesystem would.

    The container's root file system (``root``, from ``buildah mount``) is bind-mounted
    read-only in a private mount namespace, with an empty tmpfs at each of ``writable`` (the
    pod's emptyDirs; their mount points are made first, as the runtime makes them), a private
    1 GiB /dev/shm, /proc, /sys, /dev and the host's resolv.conf and hosts; then ``command``
    runs there as the image's user in its WorkingDir with its Env, as ``docker run`` runs it.
    (Not ``buildah run``: it fails removing its /run/.containerenv from a read-only root, and
    podman and crun cannot run containers on this machine.) ``command`` execs in place, so the
    returned argv's process becomes it: signal it as ``docker stop`` signals PID 1.
    """
    r = shlex.quote(str(root))
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)  # as `container`
    user, _, group = image["User"].partition(":")
    variables = dict(e.split("=", 1) for e in image["Env"]) | (env or {})
    script = [
        "set -e",
        *(f"mkdir -p {r}{shlex.quote(p)}" for p in writable),
        f"mount --rbind /dev {r}/dev",
        f"mount -t tmpfs -o size=1g,mode=1777 shm {r}/dev/shm",
        f"mount -t proc proc {r}/proc",
        f"mount --rbind /sys {r}/sys",
        f"mount --bind /etc/resolv.conf {r}/etc/resolv.conf",
        f"mount --bind /etc/hosts {r}/etc/hosts",
        *(f"mount -t tmpfs -o mode=1777 tmpfs {r}{shlex.quote(p)}" for p in writable),
        f"mount -o remount,bind,ro {r}",
        f"ulimit -n {nofile}",
        shlex.join(["exec", "chroot", f"--userspec={user}:{group or user}",
                    f"--groups={group or user}", str(root),
                    "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in variables.items()),
                    "/bin/sh", "-c", 'cd "$0" && exec "$@"', image["WorkingDir"] or "/",
                    *command]),
    ]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            "\n".join(script)]


def test_dockerfile_lint_clean():
    hadolint = ROOT / ".venv" / "bin" / "hadolint"
    path = str(hadolint) if hadolint.exists() else require_tool("hadolint")
    result = subprocess.run([path, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_image_tags_version_and_ray_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(re.sub(r"^ray\[serve\]==", "", d) for d in project["dependencies"]
                   if d.startswith("ray[serve]=="))
    dry_run = run("make", "--no-print-directory", "-n", "image", cwd=ROOT).stdout
    assert f"-t ghcr.io/serve-app/serve-app:{project['version']}-ray{ray_pin} " in dry_run


def test_container_cmd_moves_only_the_serve_ports():
    from serve_app.tools.container import config_for

    shipped = str(ROOT / "configs/serve_config.yaml")
    assert config_for({"SERVE_CONFIG": shipped}) == shipped
    for env, key, port in (({"SERVE_PORT": "18123"}, "http_options", 18123),
                           ({"SERVE_GRPC_PORT": "18124"}, "grpc_options", 18124)):
        moved = Path(config_for({"SERVE_CONFIG": shipped, **env}))
        try:
            expected = yaml.safe_load(Path(shipped).read_text())
            expected[key]["port"] = port
            assert yaml.safe_load(moved.read_text()) == expected
        finally:
            moved.unlink()


@pytest.mark.image
@pytest.mark.slow
def test_image_config_fits_kuberay(image):
    env = dict(e.split("=", 1) for e in image["Env"])
    assert image["User"] == "1000:100"
    assert image["WorkingDir"] == "/home/ray/app"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["HOME"] == "/home/ray"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert {"8000/tcp", "8265/tcp", "8080/tcp"} <= set(image["ExposedPorts"])
    assert "/-/healthz" in " ".join(image["Healthcheck"]["Test"])
    # Build-time settings (the proxy's CA, proxies) are not baked into the runtime env.
    assert not {"PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE",
                "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"} & set(env)


@pytest.mark.image
@pytest.mark.slow
def test_image_has_what_a_kuberay_pod_runs(container):
    name, _ = container
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    out = in_container(name, "id -u; id -g; command -v wget; ray --version; serve --help")
    uid, gid, wget, ray_version, *_ = out.splitlines()
    assert (uid, gid) == ("1000", "100")
    assert wget.endswith("/wget")
    assert ray_version.endswith(f"version {ray_pin}")


@pytest.mark.image
@pytest.mark.slow
def test_image_bakes_in_the_configured_models_and_no_proxy_ca(container):
    _, root = container
    config = yaml.safe_load((root / "home/ray/app/configs/serve_config.yaml").read_text())
    assert config == yaml.safe_load((ROOT / "configs/serve_config.yaml").read_text())
    for model in config["applications"][0]["args"]["models"]:
        assert list((root / "home/ray/app/model_store" / model["name"]).glob("*/model.json"))
    # The code in the image is this checkout's (a stale build cache would show here).
    (installed,) = root.glob("opt/venv/lib/python3*/site-packages/serve_app")
    ours = {p.relative_to(ROOT / "serve_app"): p.read_bytes()
            for p in (ROOT / "serve_app").rglob("*.py")}
    assert {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*.py")} == ours
    # The build secret (the host's CA bundle, with the proxy's CA) left no trace in the image.
    # (buildah may leave the empty mount point /run/secrets behind.)
    assert not [p for p in root.glob("run/secrets/**/*") if not p.is_dir()]
    host_only = pem_blocks(Path(CA_BUNDLE)) - pem_blocks(root / "etc/ssl/certs/ca-certificates.crt")
    for path in [*root.glob("etc/ssl/**/*"), *root.glob("opt/venv/**/*.pem"),
                 *root.glob("home/ray/**/*"), *root.glob("run/**/*"), *root.glob("tmp/**/*")]:
        if path.is_file() and not path.is_symlink():
            text = path.read_text(errors="ignore")
            assert not [cert for cert in host_only if cert in text], path


def pem_blocks(path: Path) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\n(.+?)-----END", path.read_text(), re.S))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.image
@pytest.mark.slow
def test_image_root_is_read_only_but_for_the_writable_paths(image, container):
    """The harness the serving test runs in: writes fail everywhere but WRITABLE_PATHS."""
    _, root = container
    probe = ("id -u; for p in /opt/venv /home/ray/app /home/ray/app/model_store /home/ray /etc"
             " /run /var/tmp \"$@\"; do touch \"$p/.probe\" 2>&1 && echo \"$p: written\"; done")
    out = run(*read_only(root, image, ["sh", "-c", probe, "sh", *WRITABLE_PATHS])).stdout
    uid, *lines = out.splitlines()
    assert uid == image["User"].split(":")[0]
    assert lines == [*[f"touch: cannot touch '{p}/.probe': Read-only file system" for p in
                       ["/opt/venv", "/home/ray/app", "/home/ray/app/model_store", "/home/ray",
                        "/etc", "/run", "/var/tmp"]],
                     *[f"{p}: written" for p in WRITABLE_PATHS]]
    assert not (root / "tmp/.probe").exists()  # written to the tmpfs, not the container's layer


@pytest.mark.image
@pytest.mark.slow
def test_image_cmd_needs_its_home_ray_dir_writable(image, container):
    """Each writable path but /tmp is there for a reason: without ~/.ray the CMD cannot start."""
    _, root = container
    command = (image.get("Entrypoint") or []) + image["Cmd"]
    assert set(WRITABLE_PATHS) == {"/tmp", "/home/ray/.ray"}
    proc = subprocess.Popen(read_only(root, image, command, writable=("/tmp",)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:  # had it started Ray after all, nothing of it stays behind
        for p in descendants(proc.pid):
            p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    # (the directory itself, or the token in it once a run made the mount point)
    assert "Read-only file system: '/home/ray/.ray" in out


@pytest.mark.image
@pytest.mark.slow
def test_image_cmd_serves_v1_and_v2_and_stops_on_sigterm(image, container, tmp_path):
    """The CMD as a hardened pod runs it: read-only root, only WRITABLE_PATHS writable."""
    _, root = container
    command = (image.get("Entrypoint") or []) + image["Cmd"]
    port = free_port()
    # Every port the CMD's Ray and Serve bind, moved off the defaults (the machine is shared).
    env = {"SERVE_PORT": port, "SERVE_GRPC_PORT": free_port(), "RAY_DASHBOARD_PORT": free_port(),
           "RAY_METRICS_EXPORT_PORT": free_port(),
           "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
           "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
           "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": free_port(),
           "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": free_port()}
    env = {k: str(v) for k, v in env.items()}
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "container.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(read_only(root, image, command, env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        wait_ready(f"{url}/v2/health/ready", proc, timeout=300)
        started = descendants(proc.pid)
        assert any("haproxy" in p.name() for p in started), "the HAProxy fast path is not on"
        # What Ray wrote went to the writable mounts (seen through the container's root).
        inside = Path(f"/proc/{proc.pid}/root")
        assert list((inside / "tmp/ray").glob("session_2*/logs/raylet.out"))
        assert list((inside / "tmp/haproxy-serve").glob("*/haproxy.cfg"))
        assert (inside / "home/ray/.ray/auth_token").is_file()
        assert not (root / "home/ray/.ray/auth_token").exists()
        with httpx.Client(base_url=url, timeout=60) as http:
            v1 = http.post("/v1/models/iris:predict", json={"instances": IRIS_ROWS})
            assert v1.status_code == 200, v1.text
            assert v1.json() == {"predictions": [0, 2]}
            v1 = http.post("/v1/models/breast-cancer:predict", json={"instances": [MALIGNANT]})
            assert v1.json() == {"predictions": [0]}

            v2 = http.post("/v2/models/iris/infer", json={
                "id": "image-test",
                "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                            "data": IRIS_ROWS}],
                "outputs": [{"name": "predict"}, {"name": "predict_proba"}]})
            assert v2.status_code == 200, v2.text
            body = v2.json()
            assert body["id"] == "image-test"
            outputs = {o["name"]: o for o in body["outputs"]}
            assert outputs["predict"]["data"] == [0, 2]
            assert outputs["predict_proba"]["shape"] == [2, 3]
            proba = outputs["predict_proba"]["data"]
            assert [sum(proba[:3]), sum(proba[3:])] == pytest.approx([1, 1])
            # the dedicated deployment, behind a DeploymentHandle
            v2 = http.post("/v2/models/diabetes/infer", json={"inputs": [{
                "name": "input-0", "shape": [1, 10], "datatype": "FP64",
                "data": [0.038, 0.051, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.020,
                         -0.018]}]})
            assert v2.status_code == 200, v2.text
            (prediction,) = v2.json()["outputs"][0]["data"]
            assert 25 <= prediction <= 346  # the range of the diabetes target

            # the EXPOSEd dashboard and metrics ports, moved by their env vars
            assert http.get(f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}/").status_code == 200
            metrics = http.get(f"http://127.0.0.1:{env['RAY_METRICS_EXPORT_PORT']}/metrics")
            assert metrics.status_code == 200

        # The image's HEALTHCHECK, run inside the container as Docker would.
        check = image["Healthcheck"]["Test"]
        assert check[0] == "CMD"
        subprocess.run(read_only(root, image, check[1:], {"SERVE_PORT": port}), check=True)

        # `docker stop`: SIGTERM to the CMD's process (the runner exec'd into it); Serve and
        # Ray shut down, exit 0.
        started = descendants(proc.pid)
        main = psutil.Process(proc.pid)
        assert main.cmdline()[1:] == command[1:] and Path(main.cmdline()[0]).name == command[0]
        main.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [p.cmdline()[:3] for p in alive]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except BaseException:
        log.flush()
        print(log_path.read_text()[-8000:])
        raise
    finally:
        # Whatever this test started and did not stop: the buildah run and its processes.
        leftovers = [p for p in started + descendants(proc.pid) if p.is_running()]
        if proc.poll() is None:
            leftovers.append(psutil.Process(proc.pid))
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if leftovers:
            proc.wait(timeout=30)
        log.close()
