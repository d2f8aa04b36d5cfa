"""Single-row throughput of the shipped config behind Ray Serve's default HTTP proxy and
behind the HAProxy/direct-ingress fast path, measured in one invocation on this machine.

    make bench-proxy            # or: .venv/bin/python bench/proxy_compare.py --duration 15

Each mode gets a fresh local Ray (the ingress mode is fixed when Ray starts), the same
config, the same store and the same wrk load (breast-cancer, one row per request, JSON).
Results go to bench/results/proxy_compare.{json,md}; the ratio is fast path / default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sklearn.datasets import load_breast_cancer

from serve_app.localserve import stop_process_group, wait_ready

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
MODES = {
    "default proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "HAProxy + direct ingress": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def wrk_script(path: Path, body: dict) -> None:
    path.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )


def parse_wrk(text: str) -> dict:
    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", text)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),
            "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "non_2xx": int(errors.group(1)) if errors else 0}


def run_mode(name: str, env_extra: dict, args, script: Path) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **env_extra}
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
    log = open(RESULTS / f"serve_{name.split()[0].lower()}.log", "w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", args.config], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = "http://127.0.0.1:8000"
    try:
        wait_ready(f"{url}/v2/models/breast-cancer/ready", proc, timeout=180)
        time.sleep(5)  # let every initial replica come up
        target = f"{url}/v1/models/breast-cancer:predict"
        wrk = ["wrk", "-t2", f"-c{args.connections}", "-s", str(script), "--latency"]
        subprocess.run(wrk + ["-d3s", target], capture_output=True)  # warm-up, not recorded
        out = subprocess.run(wrk + [f"-d{args.duration}s", target], capture_output=True, text=True).stdout
        return {"mode": name, **parse_wrk(out)}
    finally:
        stop_process_group(proc, timeout=60)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/serve_config.yaml")
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    RESULTS.mkdir(parents=True, exist_ok=True)
    script = RESULTS / "single_row.lua"
    wrk_script(script, {"instances": [load_breast_cancer().data[0].tolist()]})
    results = [run_mode(name, env, args, script) for name, env in MODES.items()]
    base = results[0]["rps"]
    for r in results:
        r["ratio_vs_default"] = round(r["rps"] / base, 2)
    (RESULTS / "proxy_compare.json").write_text(json.dumps(
        {"connections": args.connections, "duration_s": args.duration, "results": results}, indent=2))
    lines = ["| ingress | req/s | p50 ms | p99 ms | non-2xx | x default |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['non_2xx']} | {r['ratio_vs_default']} |" for r in results]
    table = "\n".join(lines)
    (RESULTS / "proxy_compare.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
