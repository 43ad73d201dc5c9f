"""Tenant B's 10-line batch, created while tenant A's big batch runs, completes while A's is
still in progress; both end with every custom_id exactly once."""

import os
import time

from nstest import client, emit
from pipeline import check_exactly_once, upload_lines, wait

a = client(os.environ["NS_API_KEY"])
b = client(os.environ["NS_OTHER_API_KEY"])
big_id = os.environ["NS_BIG_BATCH"]
small = [{"custom_id": f"s-{i}", "method": "POST", "url": "/v1/embeddings",
          "body": {"model": "sim-embed", "input": f"small {i}"}} for i in range(10)]
fid = b.files.create(file=("small.jsonl", __import__("io").BytesIO(
    ("\n".join(__import__("json").dumps(l) for l in small) + "\n").encode())), purpose="batch").id
t0 = time.monotonic()
sb = b.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
deadline = time.monotonic() + 120
while True:
    s = b.batches.retrieve(sb.id)
    if s.status in ("completed", "failed", "expired", "cancelled"):
        break
    assert time.monotonic() < deadline, s
    time.sleep(0.05)
small_secs = time.monotonic() - t0
big_then = a.batches.retrieve(big_id)
assert s.status == "completed", s
assert big_then.status == "in_progress", f"the big batch finished first ({big_then.status}): no evidence of fairness"
check_exactly_once.__globals__["c"] = b
check_exactly_once(s, [l["custom_id"] for l in small])
emit(small_secs=round(small_secs, 2), big_completed_when_small_done=big_then.request_counts.completed,
     big_total=big_then.request_counts.total)
