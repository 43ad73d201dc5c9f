#!/usr/bin/env python3
"""`make bench`: every performance target of issue 10, in one run, on both deployments.

Starts its own inference simulator, `nightshift standalone` and a distributed stack (gateway,
scheduler, finalizer, 1..4 executors) from release builds on free loopback ports, isolated from
`make up` and from tests (their own Postgres schema, queue, Redis and S3 prefixes, removed at
the end), and runs these rows side by side with the peer script (bench/peer_sdk.py):

  latency   N chat lines against an upstream of latency L and capacity C (429 above): wall
            time create -> completed against the ideal N*L/C, 429s per 1,000 requests and
            the simulator's in-flight peak against C; peer, standalone and distributed with
            each executor count of --executors.
  scaling   the same against an upstream whose capacity is 4 executors' worth of slots
            (prefetch x chunk_concurrency each): throughput with 2 and 4 executors vs 1.
  big       M embeddings at zero latency: lines/s create -> completed, CPU seconds per 1,000
            lines of every nightshift process, every process's peak RSS; while it runs,
            another tenant's 10-line batch: its create -> completed.
  upload    gateway peak RSS while a large file is uploaded and read back (bench/files_rss.py).

Prints one table (measured, ratio, target, pass/fail) and writes it, with the machine, the
date, the commit and the command, into docs/performance.md between its bench markers.
Stdlib only; the peer runs under the virtualenv that has the `openai` SDK (--peer-python).

    make bench                                  # the sizes of the issue
    BENCH_LINES=2000 BENCH_BIG_LINES=50000 make bench
    make bench-smoke                            # tiny sizes: checks the harness, not the targets
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
TERMINAL = ("completed", "failed", "expired", "cancelled")
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method, url, key=None, body=None, raw=None, headers=None, timeout=3600):
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def wait_ready(url, proc, what, deadline_secs=120):
    deadline = time.monotonic() + deadline_secs
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting (log: {proc.log})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} after {deadline_secs}s (log: {proc.log})")


def spawn(argv, log, env=None):
    out = open(log, "ab")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    proc.log = log
    return proc


def stop(proc, grace=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_secs(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


# ---------------------------------------------------------------------------------------------
# the upstream


class Simulator:
    """One `inference-sim` process with the row's latency and capacity."""

    def __init__(self, ctx, latency_ms, capacity):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = spawn([ctx.sim_bin, "--listen", f"127.0.0.1:{port}", "--base-latency-ms", str(latency_ms),
                           "--per-token-latency-ms", "0", "--max-concurrency", str(capacity)],
                          os.path.join(ctx.logs, f"inference-sim-{port}.log"),
                          {"INFERENCE_SIM_EMBEDDING_DIM": str(ctx.args.embedding_dim)})
        wait_ready(self.url + "/readyz", self.proc, "inference-sim")

    def stats(self):
        return http_json("GET", self.url + "/sim/stats")

    def stop(self):
        stop(self.proc)


# ---------------------------------------------------------------------------------------------
# the two deployments


def toml_value(v):
    return json.dumps(v)  # strings, numbers, booleans and lists of them are valid TOML as JSON


def to_toml(table, prefix=""):
    """A nested dict as TOML: plain keys first, then sub-tables, then arrays of tables."""
    out, subs = [], []
    for k, v in table.items():
        if isinstance(v, dict):
            subs.append(("table", k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            subs.append(("array", k, v))
        else:
            out.append(f"{k} = {toml_value(v)}")
    for kind, k, v in subs:
        name = f"{prefix}{k}"
        for item in (v if kind == "array" else [v]):
            out.append(f"\n[[{name}]]" if kind == "array" else f"\n[{name}]")
            out.append(to_toml(item, name + "."))
    return "\n".join(out)


class Stack:
    """What both deployments share: the config file, the API, the files to delete."""

    name = "?"

    def __init__(self, ctx, sim, executors, upstream_cap, prefetch=4, chunk_concurrency=64):
        self.ctx, self.executors = ctx, executors
        self.run_id = f"nsbench{uuid.uuid4().hex[:10]}"
        self.dir = os.path.join(ctx.work, self.run_id)
        os.makedirs(self.dir)
        self.key = f"ns-bench-{uuid.uuid4().hex}"
        self.config = {
            "telemetry": {"log_format": "json", "log_filter": "warn"},
            "internal": {"token": f"bench-internal-{uuid.uuid4().hex}"},
            "gateway": {},
            # docs/operations.md: near executors x prefetch, never below the default
            "scheduler": {"pipeline": {"max_in_flight_chunks_per_model": max(8, executors * prefetch)}},
            "executor": {"prefetch": prefetch, "chunk_concurrency": chunk_concurrency},
            "finalizer": {},
            "routing": {"upstreams": [{"name": "sim", "base_url": sim.url + "/v1", "models": ["*"],
                                       "max_concurrency": upstream_cap}]},
        }
        self.files, self.procs, self.phases = [], {}, {}

    def write_config(self):
        path = os.path.join(self.dir, "nightshift.toml")
        with open(path, "w") as f:
            f.write(to_toml(self.config) + "\n")
        return path

    # -- the OpenAI API

    def api(self, method, path, key=None, **kw):
        return http_json(method, self.base_url + path, key or self.key, **kw)

    def upload(self, lines, key=None):
        boundary = "nsbench"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.jsonl\"\r\n\r\n"
                ).encode() + lines + f"\r\n--{boundary}--\r\n".encode()
        fid = self.api("POST", "/files", key, raw=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})["id"]
        self.files.append((fid, key))
        return fid

    def create(self, file_id, endpoint, key=None):
        return self.api("POST", "/batches", key, body={"input_file_id": file_id, "endpoint": endpoint,
                                                       "completion_window": "24h"})["id"]

    def wait(self, batch_id, key=None, every=0.1, until=lambda b: False):
        """Polls the batch until it ends or `until(batch)` holds; returns the last answer.
        Notes when each status and the first and last counted line were first seen, in seconds
        after the first poll (`self.phases[batch_id]`): where a batch's time went."""
        t0 = time.monotonic()
        phases = self.phases.setdefault(batch_id, {})
        while True:
            b = self.api("GET", f"/batches/{batch_id}", key)
            at = round(time.monotonic() - t0, 3)
            counts = b["request_counts"]
            done = counts["completed"] + counts["failed"]
            for name, seen in ((b["status"], True), ("first line done", done > 0),
                               ("all lines done", counts["total"] > 0 and done >= counts["total"])):
                if seen:
                    phases.setdefault(name, at)
            if b["status"] in TERMINAL or until(b):
                return b
            time.sleep(every)

    def run_batch(self, lines, endpoint, key=None, every=0.02):
        """Uploads (untimed), then times create -> terminal. Returns (seconds, batch)."""
        fid = self.upload(lines, key)
        t0 = time.monotonic()
        bid = self.create(fid, endpoint, key)
        b = self.wait(bid, key, every)
        return time.monotonic() - t0, self.finished(b, key)

    def finished(self, b, key=None):
        for out in ("output_file_id", "error_file_id"):
            if b.get(out):
                self.files.append((b[out], key))
        return b

    def delete_files(self):
        for fid, key in self.files:
            try:
                self.api("DELETE", f"/files/{fid}", key)
            except (urllib.error.URLError, OSError) as e:
                print(f"  (could not delete {fid}: {e})", file=sys.stderr)

    def cpu(self):
        return {name: cpu_secs(p.pid) for name, p in self.procs.items()}

    def rss(self):
        return {name: peak_rss_mib(p.pid) for name, p in self.procs.items()}

    def other_tenant(self):
        """A second tenant's API key, made with `nightshift admin create-tenant`."""
        out = subprocess.run(self.admin() + ["create-tenant", "--name", "bench-small"], check=True,
                             capture_output=True, text=True).stdout
        return dict(line.split("=", 1) for line in out.split())["api_key"]

    def close(self):
        self.delete_files()
        for p in reversed(list(self.procs.values())):
            stop(p)


class Standalone(Stack):
    name = "standalone"

    def start(self):
        self.config["standalone"] = {"executors": self.executors}
        port, ops = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.ops = f"http://127.0.0.1:{ops}"
        proc = spawn([self.ctx.nightshift_bin, "--config", self.write_config(), "standalone", "--quiet",
                      "--data-dir", os.path.join(self.dir, "data"), "--listen", f"127.0.0.1:{port}",
                      "--ops-listen", f"127.0.0.1:{ops}", "--api-key", self.key],
                     os.path.join(self.dir, "standalone.log"))
        self.procs = {"standalone": proc}
        wait_ready(self.ops + "/readyz", proc, "nightshift standalone")
        return self

    def admin(self):
        # the running process's scheduler, found through its data directory
        return [self.ctx.nightshift_bin, "admin", "--data-dir", os.path.join(self.dir, "data")]

    def close(self):
        super().close()
        shutil.rmtree(os.path.join(self.dir, "data"), ignore_errors=True)


class Distributed(Stack):
    name = "distributed"

    def start(self):
        dev = self.ctx.dev_config
        ports = {s: free_port() for s in ("gateway", "gateway_ops", "scheduler", "scheduler_ops", "finalizer")}
        self.base_url = f"http://127.0.0.1:{ports['gateway']}/v1"
        scheduler_url = f"http://127.0.0.1:{ports['scheduler']}"
        self.config.update({
            "storage": {**dev["storage"], "prefix": f"{self.run_id}/"},
            "metadata": {**dev["metadata"], "schema": self.run_id},
            "queue": {"prefix": self.run_id},
            "state": {"key_prefix": f"{self.run_id}:"},
        })
        self.config["gateway"].update({"listen": f"127.0.0.1:{ports['gateway']}",
                                       "ops_listen": f"127.0.0.1:{ports['gateway_ops']}",
                                       "scheduler_url": scheduler_url})
        self.config["scheduler"].update({"listen": f"127.0.0.1:{ports['scheduler']}",
                                         "ops_listen": f"127.0.0.1:{ports['scheduler_ops']}",
                                         "bootstrap_tenant": "default", "bootstrap_api_key": self.key})
        self.config["finalizer"].update({"listen": f"127.0.0.1:{ports['finalizer']}",
                                         "scheduler_url": scheduler_url})
        self.config_path = self.write_config()
        plan = [("scheduler", {}, f"http://127.0.0.1:{ports['scheduler_ops']}")]
        for i in range(1, self.executors + 1):
            p = free_port()
            plan.append((f"executor-{i}", {"NIGHTSHIFT_EXECUTOR__LISTEN": f"127.0.0.1:{p}"}, f"http://127.0.0.1:{p}"))
        plan += [("finalizer", {}, f"http://127.0.0.1:{ports['finalizer']}"),
                 ("gateway", {}, f"http://127.0.0.1:{ports['gateway_ops']}")]
        self.procs = {}
        for name, env, ops in plan:
            service = name.split("-")[0]
            self.procs[name] = spawn([self.ctx.nightshift_bin, "--config", self.config_path, service],
                                     os.path.join(self.dir, f"{name}.log"), env)
            wait_ready(ops + "/readyz", self.procs[name], name)
        return self

    def admin(self):
        return [self.ctx.nightshift_bin, "--config", self.config_path, "admin"]

    def close(self):
        super().close()
        schema, prefix = self.run_id, self.run_id
        url = self.ctx.dev_config["metadata"]["url"]
        subprocess.run(["psql", "-q", url, "-c", f"DROP SCHEMA IF EXISTS {schema} CASCADE"], check=False,
                       capture_output=True)
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}:*"], capture_output=True,
                              text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "DEL", *keys[i:i + 500]], check=False, capture_output=True)
        queues = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True,
                                text=True).stdout.split()
        for q in queues:
            if q.startswith(prefix + "."):
                subprocess.run(["rabbitmqctl", "-q", "delete_queue", q], check=False, capture_output=True)


DEPLOYMENTS = {"standalone": Standalone, "distributed": Distributed}


# ---------------------------------------------------------------------------------------------
# inputs


def chat_lines(n, prefix="c"):
    return "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "sim-chat", "max_tokens": 16,
                                        "messages": [{"role": "user", "content": f"question {i}"}]}}) + "\n"
                   for i in range(n)).encode()


def embedding_lines(n, prefix="e"):
    return "".join(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": "sim-embed", "input": f"document {i}"}}) + "\n"
                   for i in range(n)).encode()


def check_done(b, n, what):
    counts = b["request_counts"]
    if b["status"] != "completed" or counts["completed"] != n:
        raise RuntimeError(f"{what}: batch {b['id']} ended {b['status']} with {counts} (expected {n} completed)")


# ---------------------------------------------------------------------------------------------
# the table


class Table:
    """One row per measured figure: scenario, run, measured, ratio, target, verdict."""

    def __init__(self):
        self.rows, self.details = [], {}

    def add(self, scenario, run, measured, ratio=None, target=None, ok=None):
        verdict = "" if ok is None else ("pass" if ok else "FAIL")
        self.rows.append((scenario, run, measured, ratio or "", target or "", verdict))
        print(f"  {scenario} | {run} | {measured} | {ratio or ''} | {target or ''} | {verdict}", flush=True)

    def markdown(self):
        head = ["scenario", "run", "measured", "ratio", "target", "verdict"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def run_label(stack_cls, executors):
    return f"{stack_cls.name}, {executors} executor{'s' if executors > 1 else ''}"


@contextlib.contextmanager
def simulator(ctx, latency_ms, capacity):
    sim = Simulator(ctx, latency_ms, capacity)
    try:
        yield sim
    finally:
        sim.stop()


@contextlib.contextmanager
def deployment(ctx, cls, sim, executors, upstream_cap, **tuning):
    """A started stack, closed (files deleted, processes stopped, prefixes dropped) on exit."""
    stack = cls(ctx, sim, executors, upstream_cap, **tuning)
    try:
        yield stack.start()
    finally:
        stack.close()


def attempt(table, scenario, label, run):
    """Runs one measurement; a failure becomes a FAIL row (with the reason) and the bench goes on."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - one broken run must not lose an hour of others
        traceback.print_exc()
        table.add(scenario, label, f"error: {error}".replace("|", "/")[:300], None, None, False)
        return None


def upstream_figures(stats):
    """429s per 1,000 requests, the simulator's in-flight peak, and how late its latencies ended on
    average (ms): its own timing error, which the ideal N·L/C does not include."""
    total = stats["requests"]["total"] or 1
    late = stats.get("latency_overshoot_micros", 0) / 1000 / max(stats.get("latency_waits", 0), 1)
    return stats["responses"].get("429", 0) * 1000 / total, stats["max_in_flight"], late


# ---------------------------------------------------------------------------------------------
# the rows


def run_peer(ctx, sim, lines, concurrency):
    out = subprocess.run([ctx.args.peer_python, os.path.join(BENCH, "peer_sdk.py"), "--base-url", sim.url + "/v1",
                          "--lines", str(lines), "--concurrency", str(concurrency)],
                         check=True, capture_output=True, text=True).stdout
    peer = json.loads(out)
    if peer["failed"]:
        raise RuntimeError(f"peer: {peer}")
    return peer["wall_secs"]


def run_chat_batch(ctx, cls, sim, executors, cap, lines, **tuning):
    """Create -> completed of one batch of chat lines: (seconds, when each phase was seen)."""
    with deployment(ctx, cls, sim, executors, cap, **tuning) as stack:
        wall, b = stack.run_batch(chat_lines(lines), "/v1/chat/completions")
        check_done(b, lines, run_label(cls, executors))
        return wall, stack.phases[b["id"]]


def row_latency(ctx, table):
    a = ctx.args
    ideal = a.lines * a.latency_ms / 1000 / a.capacity
    scenario = f"latency-bound: {a.lines:,} chat lines, L={a.latency_ms} ms, C={a.capacity}, ideal {ideal:.1f} s"
    runs = [("peer SDK script", None, None)]
    runs += [(run_label(cls, n), cls, n) for cls in ctx.deployments for n in a.executors]
    peer_wall = None
    for label, cls, n in runs:

        def run():
            with simulator(ctx, a.latency_ms, a.capacity) as sim:
                if cls is None:
                    wall, phases = run_peer(ctx, sim, a.lines, a.capacity), None
                else:
                    wall, phases = run_chat_batch(ctx, cls, sim, n, a.capacity, a.lines)
                return (wall, phases, *upstream_figures(sim.stats()))

        got = attempt(table, scenario, label, run)
        if got is None:
            continue
        wall, phases, per_k, peak, late = got
        ratio = wall / ideal
        peer = cls is None
        if peer:
            peer_wall = wall
        vs_peer = f" ({wall / peer_wall:.2f}× the peer's)" if peer_wall and not peer else ""
        table.add(scenario, label, f"{wall:.1f} s{vs_peer}", f"{ratio:.2f}× ideal", None if peer else "≤ 1.05× ideal",
                  None if peer else ratio <= 1.05)
        table.add("latency-bound: 429s per 1,000 requests", label, f"{per_k:.1f}", None, "report")
        table.add("latency-bound: upstream in-flight peak vs C", label, f"{peak} / {a.capacity}",
                  f"{peak / a.capacity:.2f}×", "≤ 1.00×", peak <= a.capacity)
        ctx.details[f"latency/{label}"] = {"wall_secs": round(wall, 3), "429_per_1000": round(per_k, 2),
                                           "max_in_flight": peak, "sim_latency_late_ms": round(late, 3),
                                           **({"phases_secs": phases} if phases else {})}


def row_scaling(ctx, table):
    a = ctx.args
    share = a.scale_prefetch * a.scale_chunk_concurrency
    cap = share * max(a.executors)
    scenario = (f"executor scaling: {a.scale_lines:,} chat lines, L={a.latency_ms} ms, C={cap}, "
                f"one executor {a.scale_prefetch}×{a.scale_chunk_concurrency} slots")
    targets = {2: 1.8, 4: 3.5}
    tuning = {"prefetch": a.scale_prefetch, "chunk_concurrency": a.scale_chunk_concurrency}
    for cls in ctx.deployments:
        base = None
        for n in sorted(set([1] + a.executors)):

            def run():
                with simulator(ctx, a.latency_ms, cap) as sim:
                    return run_chat_batch(ctx, cls, sim, n, cap, a.scale_lines, **tuning)

            got = attempt(table, scenario, run_label(cls, n), run)
            if got is None:
                continue
            wall, phases = got
            rate = a.scale_lines / wall
            base = base or rate
            want = targets.get(n)
            table.add(scenario, run_label(cls, n), f"{rate:,.0f} lines/s", f"{rate / base:.2f}× one",
                      f"≥ {want}× one" if want else None, rate / base >= want if want else None)
            ctx.details[f"scaling/{run_label(cls, n)}"] = {"wall_secs": round(wall, 3), "phases_secs": phases}


def measure_big(ctx, cls):
    """The big batch at zero latency, with another tenant's small batch created once it runs."""
    a = ctx.args
    with simulator(ctx, 0, 0) as sim, deployment(ctx, cls, sim, 1, a.big_upstream_cap) as stack:
        small_key = stack.other_tenant()
        big_file = stack.upload(embedding_lines(a.big_lines, "big"))
        small_file = stack.upload(embedding_lines(a.small_lines, "small"), small_key)
        cpu0 = stack.cpu()
        t0 = time.monotonic()
        big = stack.create(big_file, "/v1/embeddings")
        # the big batch's chunks are flowing (dispatched, queued, answered) before the small one
        stack.wait(big, every=0.02, until=lambda b: b["request_counts"]["completed"] > 0)
        t_small = time.monotonic()
        small = stack.create(small_file, "/v1/embeddings", small_key)
        s = stack.finished(stack.wait(small, small_key, every=0.02), small_key)
        small_secs = time.monotonic() - t_small
        progress = stack.api("GET", f"/batches/{big}")["request_counts"]
        b = stack.finished(stack.wait(big, every=0.1))
        wall = time.monotonic() - t0
        cpu1 = stack.cpu()
        check_done(b, a.big_lines, cls.name)
        check_done(s, a.small_lines, cls.name + " (small batch)")
        return {"wall_secs": round(wall, 3), "cpu_secs": {n: round(cpu1[n] - cpu0[n], 3) for n in cpu1},
                "peak_rss_mib": {n: round(v, 1) for n, v in stack.rss().items()}, "small_secs": round(small_secs, 3), "small_tenant": "another",
                "big_progress_at_small_done": f"{progress['completed']:,}/{progress['total']:,}",
                "phases_secs": {"big": stack.phases[big], "small": stack.phases[small]}}


def row_big(ctx, table):
    a = ctx.args
    goal = {"standalone": 20_000, "distributed": 10_000}
    scenario = f"zero latency: {a.big_lines:,} embeddings, create → completed"
    for cls in ctx.deployments:
        label = run_label(cls, 1)
        m = attempt(table, scenario, label, lambda: measure_big(ctx, cls))
        if m is None:
            continue
        ctx.details[f"big/{cls.name}"] = m
        rate = a.big_lines / m["wall_secs"]
        table.add(scenario, label, f"{m['wall_secs']:.1f} s, {rate:,.0f} lines/s", f"{rate / goal[cls.name]:.2f}× goal",
                  f"≥ {goal[cls.name]:,} lines/s", rate >= goal[cls.name])
        per_k = {n: v * 1000 / a.big_lines for n, v in m["cpu_secs"].items()}
        total = sum(per_k.values())
        table.add("zero latency: CPU s per 1,000 lines", label,
                  ", ".join(f"{n} {v:.3f}" for n, v in per_k.items()) + f"; total {total:.3f}",
                  f"{total / 0.05:.2f}× goal", "≤ 0.050 s (50 µs/line)", total <= 0.05)
        rss = m["peak_rss_mib"]
        worst = max(rss, key=rss.get)
        table.add("zero latency: peak RSS per process", label, ", ".join(f"{n} {v:.0f} MiB" for n, v in rss.items()),
                  f"{rss[worst] * 2**20 / 200e6:.2f}× limit ({worst})", "< 200 MB each",
                  all(v * 2**20 < 200e6 for v in rss.values()))
        table.add(f"small batch: {a.small_lines} lines of {m['small_tenant']} tenant while the big one runs", label,
                  f"{m['small_secs']:.2f} s (big at {m['big_progress_at_small_done']})", f"{m['small_secs']:.2f}× limit",
                  "< 1 s", m["small_secs"] < 1)


def measure_upload(ctx, cls):
    with simulator(ctx, 0, 0) as sim, deployment(ctx, cls, sim, 1, 64) as stack:
        gateway = stack.procs.get("gateway") or stack.procs["standalone"]
        out = subprocess.run([sys.executable, os.path.join(BENCH, "files_rss.py"), "--base-url", stack.base_url,
                              "--key", stack.key, "--size-mib", str(ctx.args.upload_mib), "--gateway-pid",
                              str(gateway.pid)], check=True, capture_output=True, text=True).stdout
        return json.loads(out)


def row_upload(ctx, table):
    scenario = f"upload: {ctx.args.upload_mib:,} MiB file, up and back down"
    for cls in ctx.deployments:
        label = run_label(cls, 1)
        res = attempt(table, scenario, label, lambda: measure_upload(ctx, cls))
        if res is None:
            continue
        ctx.details[f"upload/{cls.name}"] = res
        peak = float(res["gateway_peak_rss_after_download"].split()[0])
        table.add(scenario, label, f"gateway peak {peak:.0f} MiB", f"{peak * 2**20 / 100e6:.2f}× limit", "< 100 MB",
                  peak * 2**20 < 100e6)


ROWS = {"latency": row_latency, "scaling": row_scaling, "big": row_big, "upload": row_upload}


# ---------------------------------------------------------------------------------------------
# the report


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**20:.1f} GiB RAM, {platform.system()} {platform.release()}; "
            f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def commit():
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)docs/performance.md"],
                           capture_output=True, text=True).stdout.strip()
    return rev + (" (with uncommitted changes)" if dirty else "")


def report(ctx, table, started):
    a = ctx.args
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                   if k.startswith("BENCH_") and k not in ("BENCH_NOTE", "BENCH_COMMAND"))
    command = a.command or " ".join(shlex.quote(x) for x in ["python3", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [
        DOC_BEGIN,
        f"Measured {started:%Y-%m-%d %H:%M} UTC, {(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60:.0f} min, "
        f"commit `{commit()}`.",
        "",
        f"- Machine: {machine()}.",
        f"- Command: `{(env + ' ') if env else ''}{command}`.",
        f"- Sizes: latency N={a.lines:,} (L={a.latency_ms} ms, C={a.capacity}); scaling N={a.scale_lines:,}; "
        f"big M={a.big_lines:,} embeddings (dimension {a.embedding_dim}), small batch {a.small_lines} lines; "
        f"upload {a.upload_mib:,} MiB; executors {', '.join(map(str, a.executors))}.",
    ]
    if a.note:
        lines += ["", f"**{a.note}**"]
    lines += ["", table.markdown(), "", "<details><summary>Raw figures</summary>", "", "```json",
              json.dumps(ctx.details, indent=1), "```", "", "</details>", DOC_END]
    block = "\n".join(lines)
    doc = a.doc
    text = open(doc).read() if os.path.exists(doc) else ""
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = head + block + rest.split(DOC_END, 1)[1]
    else:
        text = (text or "# Performance\n\nWritten by `make bench` (bench/bench.py) between the bench markers; "
                "text outside them is kept.\n\n") + block + "\n"
    with open(doc, "w") as f:
        f.write(text)
    print("\n" + table.markdown() + f"\n\nwritten to {os.path.relpath(doc, ROOT)}")


class Ctx:
    def __init__(self, args):
        self.args = args
        self.nightshift_bin = os.path.join(args.target_dir, "nightshift")
        self.sim_bin = os.path.join(args.target_dir, "inference-sim")
        self.deployments = [DEPLOYMENTS[d] for d in args.deployments]
        self.work = os.path.join(ROOT, "target", "bench", time.strftime("%Y%m%dT%H%M%S"))
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        with open(os.path.join(ROOT, "deploy", "dev", "nightshift.toml"), "rb") as f:
            self.dev_config = tomllib.load(f)
        self.details = {}


def env_int(name, default):
    return int(os.environ.get(name, default))


def csv(value):
    return [x.strip() for x in value.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=env_int("BENCH_LINES", 20_000), help="latency row N (BENCH_LINES)")
    ap.add_argument("--latency-ms", type=int, default=env_int("BENCH_LATENCY_MS", 50), help="upstream latency L")
    ap.add_argument("--capacity", type=int, default=env_int("BENCH_CAPACITY", 64), help="upstream capacity C")
    ap.add_argument("--scale-lines", type=int, default=env_int("BENCH_SCALE_LINES", 20_000))
    ap.add_argument("--scale-prefetch", type=int, default=env_int("BENCH_SCALE_PREFETCH", 2),
                    help="executor.prefetch in the scaling row")
    ap.add_argument("--scale-chunk-concurrency", type=int, default=env_int("BENCH_SCALE_CHUNK_CONCURRENCY", 16),
                    help="executor.chunk_concurrency in the scaling row")
    ap.add_argument("--big-lines", type=int, default=env_int("BENCH_BIG_LINES", 1_000_000), help="big row M")
    ap.add_argument("--big-upstream-cap", type=int, default=env_int("BENCH_BIG_UPSTREAM_CAP", 64),
                    help="the upstream's max_concurrency in the big row (the simulator has no cap)")
    ap.add_argument("--small-lines", type=int, default=env_int("BENCH_SMALL_LINES", 10))
    ap.add_argument("--embedding-dim", type=int, default=env_int("BENCH_EMBEDDING_DIM", 384))
    ap.add_argument("--upload-mib", type=int, default=env_int("BENCH_UPLOAD_MIB", 1024))
    ap.add_argument("--executors", type=lambda v: [int(x) for x in csv(v)],
                    default=[int(x) for x in csv(os.environ.get("BENCH_EXECUTORS", "1,2,4"))])
    ap.add_argument("--deployments", type=csv, default=csv(os.environ.get("BENCH_DEPLOYMENTS", "standalone,distributed")))
    ap.add_argument("--rows", type=csv, default=csv(os.environ.get("BENCH_ROWS", ",".join(ROWS))))
    ap.add_argument("--target-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--peer-python", default=os.path.join(ROOT, "target", "e2e-venv", "bin", "python"))
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "performance.md"))
    ap.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""), help="a line printed above the table")
    ap.add_argument("--command", default=os.environ.get("BENCH_COMMAND", ""), help="the command to record")
    args = ap.parse_args()
    for r in args.rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r} (rows: {', '.join(ROWS)})")
    started = datetime.datetime.now(datetime.timezone.utc)
    ctx = Ctx(args)
    table = Table()
    print(f"bench: work dir {os.path.relpath(ctx.work, ROOT)}", flush=True)
    for r in args.rows:
        print(f"row {r}", flush=True)
        ROWS[r](ctx, table)
    report(ctx, table, started)


if __name__ == "__main__":
    main()
