"""``serve-app``: the project's command line (the pyproject entry point): ``manifests``, ``publish``
(a model file to the store, docs/your-own-model-cli.md), ``models`` (what the store holds), ``score``
(a whole table with a stored model on Ray Data, docs/batch-scoring.md) and ``serve`` / ``stop``
(a local server and exactly its processes, ``make serve`` / ``make stop``).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``run``; add a command by writing one and listing it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from serve_app.store import DEFAULT_STORE, ModelStore, ModelStoreError, store_from_environment

# A store that cannot be reached or read: a message and exit status 2, not a traceback.
STORE_FAILURES = (ModelStoreError, BotoCoreError, ClientError, OSError)


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
    from serve_app.config import ServeConfigError  # on demand, as manifests below
    from serve_app.tools import manifests  # on demand: other commands need no YAML or kubectl

    root = args.root or manifests.ROOT
    try:
        if args.check:
            stale = manifests.out_of_date(root)
            for path in stale:
                print(f"out of date: {path} (run `make manifests`)", file=sys.stderr)
            if not stale:
                print("manifests are up to date")
            return 1 if stale else 0
        changed = manifests.write(root)
    except ServeConfigError as exc:
        print(f"{manifests.SERVE_CONFIG}: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("manifests are up to date")
    return 0


def _add_publish(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish", help="publish a model saved as a file (XGBoost .json/.ubj, .skops; pickle on request)",
        description="Publish a model file as the next version of NAME, with the schema of its training "
                    "rows (--sample): the same checks as serve_app.publish(), which this calls.")
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT",
                        help="the model: .json/.ubj (XGBoost), .skops, or .joblib/.pkl/.pickle with --allow-pickle")
    parser.add_argument("--name", required=True, help="the model's name in the store")
    parser.add_argument("--sample", required=True, type=Path, metavar="FILE",
                        help="the training rows, CSV or Parquet: the schema's source")
    parser.add_argument("--store", default=None, help="local path or s3://bucket/prefix "
                        "(default: SERVE_APP_STORE, else ./model_store)")
    parser.add_argument("--version", default=None, help="the version to write (default: the next number)")
    parser.add_argument("--classes", default=None, type=_comma_list, metavar="A,B,...",
                        help="an XGBoost classifier's labels in class-index order (it only knows 0..k-1)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle a .joblib/.pkl/.pickle file here (it runs the file's code); "
                             "it is stored as skops/UBJSON, never as a pickle")
    parser.add_argument("--description", default="", metavar="TEXT",
                        help="a line about the model, kept in its metadata")
    parser.add_argument("--unknown-categories", choices=("allow", "reject"), default=None,
                        help="whether values outside a column's training categories reach the model "
                             "(default: allow exactly when every encoder ignores unknown values)")
    parser.set_defaults(run=_run_publish)


def _comma_list(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if not all(labels):
        raise argparse.ArgumentTypeError(f"empty label in {text!r}")
    return labels


def _run_publish(args: argparse.Namespace) -> int:
    from serve_app.tools.publish_files import PublishError, publish_file  # on demand: pandas, XGBoost, skops

    store = _store(args.store)
    try:
        meta = publish_file(args.artifact, args.name, args.sample, store=store, version=args.version,
                            classes=args.classes, allow_pickle=args.allow_pickle, description=args.description,
                            unknown_categories=args.unknown_categories)
    except (PublishError, *STORE_FAILURES) as exc:
        print(f"serve-app publish: {exc}", file=sys.stderr)
        return 2
    print(f"published {meta.name} version {meta.version} ({meta.framework} {meta.task}, input form "
          f"{meta.input_form}) to {_location(store, meta.name, meta.version)}")
    return 0


def _store(uri: str | None) -> ModelStore:
    return ModelStore(uri or store_from_environment() or DEFAULT_STORE)


def _location(store: ModelStore, *parts: str) -> str:
    return "/".join([str(store.backend).rstrip("/"), *parts])


def _add_models(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list the stored models, their versions and the latest one's schema",
        description="Every model in the store with its versions; for the latest version its "
                    "framework, task, input form and schema (features, dtypes, categories, nullable).")
    parser.add_argument("--store", default=None, help="local path or s3://bucket/prefix "
                        "(default: SERVE_APP_STORE, else ./model_store)")
    parser.add_argument("--json", action="store_true", help="one JSON document, for machines")
    parser.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    store = _store(args.store)
    try:
        models = [_describe_model(store, name, versions) for name, versions in store.list_models().items()]
    except STORE_FAILURES as exc:
        print(f"serve-app models: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"store": _location(store), "models": models}, indent=2))
    else:
        print("\n".join(_models_text(_location(store), models)))
    return 0


def _describe_model(store: ModelStore, name: str, versions: list[str]) -> dict:
    """One model for the listing: its versions, and what its latest version serves."""
    entry = {"name": name, "versions": versions, "latest": versions[-1] if versions else None}
    if versions:
        meta = store.read_metadata(name, versions[-1])
        entry.update(framework=meta.framework, task=meta.task, input_form=meta.input_form, classes=meta.classes,
                     features=[{"name": f.name, "dtype": f.dtype, "categories": f.categories,
                                "nullable": f.nullable} for f in meta.features])
    return entry


def _models_text(location: str, models: list[dict]) -> list[str]:
    """A table of the models, then each latest version's schema as a table of its own."""
    if not models:
        return [f"no models in {location}"]
    lines = [f"store: {location}", ""]
    lines += _table(["MODEL", "VERSIONS", "LATEST", "FRAMEWORK", "TASK", "INPUT"],
                    [[m["name"], ", ".join(m["versions"]) or "-", m["latest"] or "-", m.get("framework", "-"),
                      m.get("task", "-"), m.get("input_form", "-")] for m in models])
    for model in (m for m in models if m["latest"]):
        classes = f"; classes {', '.join(map(str, model['classes']))}" if model["classes"] else ""
        lines += ["", f"{model['name']} version {model['latest']}: {len(model['features'])} features{classes}"]
        lines += _table(["FEATURE", "DTYPE", "NULLABLE", "CATEGORIES"],
                        [[f["name"], f["dtype"], "yes" if f["nullable"] else "no",
                          ", ".join(map(str, f["categories"])) if f["categories"] is not None else "-"]
                         for f in model["features"]], indent="  ")
    return lines


def _table(headers: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart (the last column unpadded)."""
    widths = [max(len(str(row[j])) for row in [headers, *rows]) for j in range(len(headers))]
    return [indent + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


RUN_FILE = Path(".serve-app/run.json")  # what `serve` started, for `stop`


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a Serve config on a local Ray of its own until Ctrl-C (make serve)",
        description="Start a local Ray with a private temp dir, deploy the config, record what was "
                    "started in the run file, serve until SIGINT/SIGTERM, then stop exactly that.")
    parser.add_argument("--config", default="configs/serve_config.yaml", help="the Serve config to run")
    parser.add_argument("--run-file", type=Path, default=RUN_FILE,
                        help=f"where to record what was started (default {RUN_FILE}; `serve-app stop` reads it)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--metrics-export-port", type=int, default=None,
                        help="Ray's Prometheus metrics port (default: Ray picks one)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from serve_app.tools import supervisor  # on demand: Ray takes seconds to import

    return supervisor.serve_forever(supervisor.Options(
        config=args.config, run_file=args.run_file,
        dashboard_port=args.dashboard_port, metrics_export_port=args.metrics_export_port))


def _add_stop(subparsers) -> None:
    parser = subparsers.add_parser(
        "stop", help="stop the server a run file records, and nothing else (make stop)",
        description="Stop the `serve-app serve` recorded in the run file: its supervisor, every Ray "
                    "process and the HAProxy it started. Other local Ray clusters are not touched.")
    parser.add_argument("--run-file", type=Path, default=RUN_FILE, help=f"the run file of the server (default {RUN_FILE})")
    parser.set_defaults(run=_run_stop)


def _run_stop(args: argparse.Namespace) -> int:
    from serve_app.tools import supervisor  # on demand: Ray takes seconds to import

    return supervisor.stop(args.run_file)


def _add_score(subparsers) -> None:
    from serve_app.scoring import DEFAULT_BATCH_ROWS, ON_ERROR, SCORE_ENV  # here: importing cli.py stays free of pyarrow

    parser = subparsers.add_parser(
        "score", help="score a whole table (Parquet or CSV; a file, a folder or s3://) with a stored model on Ray Data",
        description="Validate every row as serving does and score it with the stored model on a Ray Data actor "
                    "pool; refused rows go to an errors file. Exit status: 0 all rows scored, 2 the run failed "
                    "(or a row was refused with --on-error fail), 3 rows were refused (--on-error continue). "
                    "docs/batch-scoring.md")
    # Each of these three may come from the environment instead (SERVE_APP_SCORE_MODEL, ...): the RayJob's way.
    given = {name: os.environ.get(variable) or None for name, variable in SCORE_ENV.items()}
    parser.add_argument("--model", default=given["model"], required=not given["model"],
                        help="the model's name in the store (default: SERVE_APP_SCORE_MODEL)")
    parser.add_argument("--version", default=None, help="the version to use (default: the latest)")
    parser.add_argument("--input", default=given["input"], required=not given["input"], metavar="PATH",
                        help="a .parquet/.csv file, a folder of them, or s3://... (default: SERVE_APP_SCORE_INPUT)")
    parser.add_argument("--output", default=given["output"], required=not given["output"], metavar="PATH",
                        help="where the scores go: a Parquet folder, or CSV files when PATH ends in .csv "
                             "(default: SERVE_APP_SCORE_OUTPUT)")
    parser.add_argument("--store", default=None, help="local path or s3://bucket/prefix "
                        "(default: SERVE_APP_STORE, else ./model_store)")
    parser.add_argument("--address", default=None, metavar="auto|ray://...",
                        help="attach to a running Ray cluster (default: start a local Ray on this machine's cores)")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, metavar="N",
                        help=f"rows per model call (default {DEFAULT_BATCH_ROWS})")
    parser.add_argument("--output-columns", type=_comma_list, default=["predict"], metavar="predict,predict_proba",
                        help="predict (labels or values) and/or predict_proba (one proba_<class> column per class)")
    parser.add_argument("--key-columns", type=_comma_list, default=None, metavar="A,B,...",
                        help="input columns copied to the output (default: every column that is not a feature)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="a refused row stops the run (fail, exit 2) or is set aside (continue, exit 3)")
    parser.add_argument("--errors", default=None, metavar="PATH",
                        help="the refused rows' file (default: <output>.errors.parquet; .csv for CSV)")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="scoring actors at most (default: the cluster's CPUs)")
    parser.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from serve_app import scoring  # on demand: Ray Data and pyarrow

    try:
        summary = scoring.score(args.model, args.input, args.output, version=args.version, store=args.store,
                                outputs=args.output_columns, key_columns=args.key_columns, batch_rows=args.batch_rows,
                                on_error=args.on_error, errors=args.errors, address=args.address,
                                concurrency=args.concurrency)
    except (scoring.ScoreError, *STORE_FAILURES) as exc:
        print(f"serve-app score: {exc}", file=sys.stderr)
        return scoring.EXIT_FAILED
    print(summary)
    return summary.exit_status


SUBCOMMANDS = (_add_manifests, _add_publish, _add_models, _add_score, _add_serve, _add_stop)


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
