#!/usr/bin/env python3
"""Peak memory of the gateway while it streams a large file in and out.

Uploads a generated JSONL file of --size-mib MiB (purpose=batch, so the UTF-8/JSONL sniffing
runs too) to a running stack, downloads it back, checks it byte for byte (SHA-256 on both
sides), and reports the gateway's resident memory: its peak (VmHWM) before, after the upload
and after the download, plus throughput. Stdlib only; the bytes are generated and hashed on
the fly, so this script holds no more than one chunk either.

    make up PROFILE=release && make bench-files       # 1 GiB
    SIZE_MIB=4096 make bench-files
"""

import argparse
import hashlib
import http.client
import json
import os
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = 1024  # bytes per generated line, newline included


def vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found for pid {pid}")


class RssSampler(threading.Thread):
    """Samples VmRSS every 20 ms (VmHWM gives the exact peak; this shows the shape)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.max, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.max = max(self.max, vm(self.pid, "VmRSS"))
            time.sleep(0.02)


def lines(total_bytes, digest):
    n = total_bytes // LINE
    pad_base = '{"custom_id": "r%010d", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "'
    buf = []
    for i in range(n):
        head = pad_base % i
        line = (head + "x" * (LINE - len(head) - 4) + '"}}\n').encode()
        assert len(line) == LINE
        buf.append(line)
        if len(buf) == 1024:
            chunk = b"".join(buf)
            digest.update(chunk)
            yield chunk
            buf = []
    if buf:
        chunk = b"".join(buf)
        digest.update(chunk)
        yield chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--key", default=os.environ.get("NIGHTSHIFT_BOOTSTRAP_API_KEY", "ns-dev-key"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--gateway-pid", type=int)
    args = ap.parse_args()
    pid = args.gateway_pid or int(open(os.path.join(os.environ.get("NIGHTSHIFT_DEV_DIR", os.path.join(ROOT, ".dev")), "run", "gateway.pid")).read())
    url = urllib.parse.urlparse(args.base_url)
    size = args.size_mib * 1024 * 1024 // LINE * LINE

    boundary = "nightshiftbench"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    up_digest = hashlib.sha256()

    def body():
        yield head
        yield from lines(size, up_digest)
        yield tail

    hwm_start, rss_start = vm(pid, "VmHWM"), vm(pid, "VmRSS")
    sampler = RssSampler(pid)
    sampler.start()

    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    t0 = time.monotonic()
    conn.putrequest("POST", url.path + "/files")
    conn.putheader("Authorization", f"Bearer {args.key}")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Content-Length", str(len(head) + size + len(tail)))
    conn.endheaders()
    for chunk in body():
        conn.send(chunk)
    resp = conn.getresponse()
    created = json.loads(resp.read())
    up_secs = time.monotonic() - t0
    assert resp.status == 200, created
    assert created["bytes"] == size, created
    hwm_up = vm(pid, "VmHWM")

    t0 = time.monotonic()
    conn.request("GET", f"{url.path}/files/{created['id']}/content", headers={"Authorization": f"Bearer {args.key}"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    down_digest, got = hashlib.sha256(), 0
    while True:
        chunk = resp.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        down_digest.update(chunk)
    down_secs = time.monotonic() - t0
    hwm_down = vm(pid, "VmHWM")
    sampler.stop.set()
    sampler.join()

    conn.request("DELETE", f"{url.path}/files/{created['id']}", headers={"Authorization": f"Bearer {args.key}"})
    conn.getresponse().read()

    assert got == size, (got, size)
    assert up_digest.digest() == down_digest.digest(), "downloaded bytes differ from uploaded bytes"
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    print(json.dumps({
        "file_bytes": size,
        "byte_for_byte": True,
        "gateway_rss_at_start": mib(rss_start),
        "gateway_peak_rss_before": mib(hwm_start),
        "gateway_peak_rss_after_upload": mib(hwm_up),
        "gateway_peak_rss_after_download": mib(hwm_down),
        "gateway_max_sampled_rss": mib(sampler.max),
        "upload_mib_per_s": round(size / 2**20 / up_secs, 1),
        "download_mib_per_s": round(size / 2**20 / down_secs, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
