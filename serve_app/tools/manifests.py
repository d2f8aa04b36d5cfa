"""The Kubernetes manifests' generated part, and rendering them.

The RayService's ``serveConfigV2`` is ``configs/serve_config.yaml`` byte for byte, and its
``rayVersion`` and image tag follow the pins in ``pyproject.toml``. None of that is copied by
hand: ``serve-app manifests`` (``make manifests``) writes ``cluster/base/generated/`` from those
sources, and ``serve-app manifests --check`` and the tests fail when the two drift apart. The
generated directory is a kustomize Component that the base includes, so every overlay carries it.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve_app.config import check_serve_config
from serve_app.tools import alert_rules

ROOT = Path(__file__).resolve().parents[2]  # the checkout: serve_app/tools/ -> repository root
SERVE_CONFIG = Path("configs/serve_config.yaml")
GENERATED_DIR = Path("cluster/base/generated")
IMAGE_NAME = "ghcr.io/serve-app/serve-app"
RAYSERVICE_NAME = "serve-app"

_HEADER = (
    "# Generated from {sources} by `make manifests`.\n"
    "# Do not edit: change the sources and regenerate (`serve-app manifests --check` finds drift).\n"
)


@dataclass(frozen=True)
class Pins:
    """The versions every artefact must agree on (developers' guide: one exact Ray everywhere)."""

    project_version: str
    ray_version: str

    @property
    def image_tag(self) -> str:
        return f"{self.project_version}-ray{self.ray_version}"

    @property
    def image(self) -> str:
        return f"{IMAGE_NAME}:{self.image_tag}"


def read_pins(root: Path = ROOT) -> Pins:
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        match = re.fullmatch(r"ray\[[^\]]*\]==(\S+)", dependency.replace(" ", ""))
        if match:
            return Pins(project["version"], match.group(1))
    raise ValueError("pyproject.toml pins no ray[...]==<version> dependency")


def literal_block(text: str, indent: str) -> str:
    """``text`` as a YAML literal block scalar (the part after ``key: ``), kept byte for byte."""
    if text.endswith("\n\n"):
        chomp = "+"
    elif text.endswith("\n"):
        chomp = ""
    else:
        chomp = "-"
    indicator = str(len(indent)) if text[:1] in (" ", "\n") else ""
    body = "".join(f"{indent}{line}\n" if line else "\n" for line in text.splitlines())
    return f"|{indicator}{chomp}\n{body}"


def rayservice_patch(serve_config: str, pins: Pins) -> str:
    """The strategic-merge patch that puts the generated fields on the base RayService."""
    text = (
        _HEADER.format(sources=f"{SERVE_CONFIG} and pyproject.toml")
        + "apiVersion: ray.io/v1\n"
        + "kind: RayService\n"
        + "metadata:\n"
        + f"  name: {RAYSERVICE_NAME}\n"
        + "spec:\n"
        + "  rayClusterConfig:\n"
        + f'    rayVersion: "{pins.ray_version}"\n'
        + "  serveConfigV2: "
        + literal_block(serve_config, "    ")
    )
    loaded = yaml.safe_load(text)["spec"]["serveConfigV2"]
    if loaded != serve_config:
        raise ValueError(f"{SERVE_CONFIG} does not survive embedding as a YAML block scalar "
                         "(whitespace-only lines or tabs in its indentation?)")
    return text


def component(pins: Pins) -> str:
    return (
        _HEADER.format(sources="pyproject.toml")
        + "apiVersion: kustomize.config.k8s.io/v1alpha1\n"
        + "kind: Component\n"
        + "images:\n"
        + f"  - name: {IMAGE_NAME}\n"
        + f"    newTag: {pins.image_tag}\n"
        + "patches:\n"
        + "  - path: rayservice.yaml\n"
    )


def generated_files(root: Path = ROOT) -> dict[Path, str]:
    """Relative path -> content of every generated file, from the sources as they are now."""
    from serve_app.tools import ray_dashboards  # Ray's Grafana dashboards, from the installed (pinned) Ray

    pins = read_pins(root)
    serve_config = (root / SERVE_CONFIG).read_text()
    check_serve_config(yaml.safe_load(serve_config))  # what a replica would refuse does not ship
    return {
        GENERATED_DIR / "kustomization.yaml": component(pins),
        GENERATED_DIR / "rayservice.yaml": rayservice_patch(serve_config, pins),
        alert_rules.MANIFEST: alert_rules.render(root),
        **ray_dashboards.generated_files(pins.ray_version),
    }


def out_of_date(root: Path = ROOT) -> list[Path]:
    """Generated files that are missing or differ from what their sources produce now."""
    stale = []
    for path, content in generated_files(root).items():
        target = root / path
        if not target.is_file() or target.read_text() != content:
            stale.append(path)
    return stale


def write(root: Path = ROOT) -> list[Path]:
    """Regenerate; returns the files that changed."""
    changed = []
    for path, content in generated_files(root).items():
        target = root / path
        if not target.is_file() or target.read_text() != content:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            changed.append(path)
    return changed


def render(kustomization_dir: Path, kubectl: str = "kubectl") -> list[dict]:
    """Every object ``kubectl kustomize`` renders from a kustomization directory."""
    result = subprocess.run([kubectl, "kustomize", str(kustomization_dir)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def the_rayservice(objects: list[dict]) -> dict:
    found = [o for o in objects if o.get("kind") == "RayService"]
    if len(found) != 1:
        raise ValueError(f"expected one RayService, rendered {len(found)}")
    return found[0]
