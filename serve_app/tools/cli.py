"""``serve-app``: the project's command line (the pyproject entry point).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``run``; add a command by writing one and listing it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_manifests(subparsers) -> None:
    parser = subparsers.add_parser(
        "manifests",
        help="generate cluster/base/generated/ (serveConfigV2, rayVersion, image tag) and the PrometheusRule",
        description="Write the RayService's generated fields from configs/serve_config.yaml and "
                    "the version pins in pyproject.toml; with --check, only report drift.")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated file is out of date")
    parser.add_argument("--root", type=Path, default=None,
                        help="repository root (default: the checkout serve_app is imported from)")
    parser.set_defaults(run=_run_manifests)


def _run_manifests(args: argparse.Namespace) -> int:
    from serve_app.tools import manifests  # on demand: other commands need no YAML or kubectl

    root = args.root or manifests.ROOT
    if args.check:
        stale = manifests.out_of_date(root)
        for path in stale:
            print(f"out of date: {path} (run `make manifests`)", file=sys.stderr)
        if not stale:
            print("manifests are up to date")
        return 1 if stale else 0
    changed = manifests.write(root)
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("manifests are up to date")
    return 0


SUBCOMMANDS = (_add_manifests,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="serve-app", description="scikit-learn and XGBoost models on Ray Serve: project tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
