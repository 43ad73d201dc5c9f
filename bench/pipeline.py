#!/usr/bin/env python3
"""Pipeline benchmarks against a running stack (`make up PROFILE=release`), stdlib only.

  fairness  tenant A submits a --big-lines batch; once it runs, tenant B submits a 10-line
            batch. Reports B's and A's wall times (B should finish long before A).
  scale     one --lines batch of embeddings (run the simulator at zero latency:
            `INFERENCE_SIM_BASE_LATENCY_MS=0 INFERENCE_SIM_PER_TOKEN_LATENCY_MS=0 make up`).
            Reports wall time, throughput, and each service's peak RSS (VmHWM), and checks
            every custom_id appears exactly once in the results.

    python3 bench/pipeline.py fairness --big-lines 200000
    python3 bench/pipeline.py scale --lines 1000000

Against `nightshift standalone` (one process): pass its key and pid, e.g.
    INFERENCE_SIM_PER_TOKEN_LATENCY_MS=0 target/release/nightshift standalone --simulate \
        --data-dir /tmp/ns-bench & PID=$!
    python3 bench/pipeline.py scale --lines 1000000 --key "$(cat /tmp/ns-bench/api-key)" --pid "$PID"
(`make bench-standalone` does exactly that.)
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = os.environ.get("NIGHTSHIFT_DEV_DIR", os.path.join(ROOT, ".dev"))
SERVICES = ["gateway", "scheduler", "executor", "finalizer", "inference-sim"]


def api(method, path, key, body=None, raw=None, headers=None):
    url = ARGS.base_url + path
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    elif raw is not None:
        data = raw
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    with urllib.request.urlopen(req, timeout=3600) as r:
        payload = r.read()
        return payload if path.endswith("/content") else json.loads(payload)


def upload(key, n, prefix):
    boundary = "nsbench"
    lines = "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": "sim-embed", "input": f"document {i}"}}) + "\n"
                    for i in range(n)).encode()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{prefix}.jsonl\"\r\n\r\n").encode() \
        + lines + f"\r\n--{boundary}--\r\n".encode()
    return api("POST", "/files", key, raw=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})["id"]


def create(key, file_id):
    return api("POST", "/batches", key, {"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                          "completion_window": "24h"})["id"]


def wait(key, batch_id, every=0.5):
    while True:
        b = api("GET", f"/batches/{batch_id}", key)
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        time.sleep(every)


def new_key(name):
    out = subprocess.run([ARGS.bin, "--config", os.path.join(ROOT, "deploy/dev/nightshift.toml"),
                          "admin", "create-tenant", "--name", name], check=True, capture_output=True, text=True)
    return dict(l.split("=", 1) for l in out.stdout.split())["api_key"]


def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return f"{int(line.split()[1]) / 1024:.1f} MiB"
    return "n/a"


def peak_rss():
    if ARGS.pid:
        return {"standalone": vm_hwm(ARGS.pid)}
    out = {}
    for s in SERVICES:
        try:
            out[s] = vm_hwm(int(open(os.path.join(DEV, "run", f"{s}.pid")).read()))
        except (OSError, ValueError):
            out[s] = "n/a"
    return out


def fairness():
    a, b = new_key("bench-big"), new_key("bench-small")
    big_file = upload(a, ARGS.big_lines, "big")
    t_big = time.monotonic()
    big = create(a, big_file)
    while api("GET", f"/batches/{big}", a)["status"] == "validating":
        time.sleep(0.1)
    small_file = upload(b, 10, "small")
    t_small = time.monotonic()
    small = create(b, small_file)
    s = wait(b, small, every=0.05)
    small_secs = time.monotonic() - t_small
    big_at = api("GET", f"/batches/{big}", a)
    g = wait(a, big)
    big_secs = time.monotonic() - t_big
    print(json.dumps({"big_lines": ARGS.big_lines, "small_status": s["status"], "small_secs": round(small_secs, 2),
                      "big_progress_when_small_done": f"{big_at['request_counts']['completed']}/{big_at['request_counts']['total']}",
                      "big_status": g["status"], "big_secs": round(big_secs, 2)}, indent=2))


def scale():
    key = ARGS.key
    t0 = time.monotonic()
    fid = upload(key, ARGS.lines, "r")
    up_secs = time.monotonic() - t0
    t1 = time.monotonic()
    bid = create(key, fid)
    b = wait(key, bid, every=2)
    run_secs = time.monotonic() - t1
    rss = peak_rss()
    seen = 0
    ids = set()
    for fid_out in (b["output_file_id"], b["error_file_id"]):
        if fid_out:
            for line in api("GET", f"/files/{fid_out}/content", key).splitlines():
                cid = json.loads(line)["custom_id"]
                assert cid not in ids, f"duplicate {cid}"
                ids.add(cid)
                seen += 1
    assert seen == ARGS.lines, (seen, ARGS.lines)
    print(json.dumps({"lines": ARGS.lines, "status": b["status"], "request_counts": b["request_counts"],
                      "upload_secs": round(up_secs, 1), "create_to_terminal_secs": round(run_secs, 1),
                      "lines_per_sec": round(ARGS.lines / run_secs), "every_custom_id_once": True,
                      "peak_rss": rss}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["fairness", "scale"])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--key", default=os.environ.get("NIGHTSHIFT_BOOTSTRAP_API_KEY", "ns-dev-key"))
    ap.add_argument("--bin", default=os.environ.get("NIGHTSHIFT_BIN", os.path.join(ROOT, "target/debug/nightshift")))
    ap.add_argument("--big-lines", type=int, default=200_000)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--pid", type=int, help="peak RSS of this one process (nightshift standalone)")
    ARGS = ap.parse_args()
    {"fairness": fairness, "scale": scale}[ARGS.scenario]()
