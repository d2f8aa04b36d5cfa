"""Load-test your own deployment with Locust: any model, either protocol, JSON or binary bodies.

    .venv/bin/locust -f bench/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    .venv/bin/locust -f bench/locustfile.py --host https://models.example.com --headless \\
        -u 64 -r 16 -t 2m --model breast-cancer --protocol v2-binary --rows 1000 --token "$TOKEN"

``--host`` is the deployment's base URL (``make serve``, a port-forward, an ingress).
Each user reads the model's V2 metadata once for its feature count, then sends the same
request in a loop: ``--rows`` rows of random values, as ``--protocol`` says (``v1``: KServe V1
JSON; ``v2``: V2 JSON; ``v2-binary``: the V2 binary tensor extension; ``npy``: an
``application/x-npy`` body). ``--token`` sends ``Authorization: Bearer`` (the data-plane
token, docs/reliability-security.md#authentication). Locust's stats are per request name
(``<protocol> <model> x<rows>``); ``--csv PREFIX`` writes them to files.

Locust's Python clients cost far more CPU per request than wrk: on a small machine the load
generator, not the server, may be the limit (``make bench`` uses wrk for that reason).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from locust import FastHttpUser, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench.workloads
from bench.workloads import instances, npy, v2_binary, v2_json  # noqa: E402

PROTOCOLS = ("v1", "v2", "v2-binary", "npy")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--model", default="iris", help="served model name")
    parser.add_argument("--protocol", default="v2", choices=PROTOCOLS, help="request format")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--token", default="", help="bearer token, if the deployment requires one")


class ModelUser(FastHttpUser):
    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        metadata = self.client.get(f"/v2/models/{options.model}", headers=self.headers,
                                   name="metadata").json()
        n_features = metadata["inputs"][0]["shape"][-1]
        X = np.random.default_rng(0).normal(size=(options.rows, n_features))
        model = options.model
        request = {"v1": lambda: instances(f"/v1/models/{model}:predict", X),
                   "v2": lambda: v2_json(model, X),
                   "v2-binary": lambda: v2_binary(model, X),
                   "npy": lambda: npy(f"/v2/models/{model}/infer", X)}[options.protocol]()
        self.request = request
        self.request_headers = {**request.headers, **self.headers}
        self.request_name = f"{options.protocol} {model} x{options.rows}"

    @task
    def predict(self) -> None:
        self.client.post(self.request.path, data=self.request.body, headers=self.request_headers,
                         name=self.request_name)
