"""A valid 95-line input (seed 001's shape, CRLF endings, unicode) validates to in_progress;
the Rust side then checks its chunks."""

import io
import json
import time

from nstest import client, emit

c = client()
lines = [json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                              "messages": [{"role": "user", "content": f"question {i} ✓"}], "max_tokens": 64}})
         for i in range(95)]
data = ("\r\n".join(lines) + "\r\n").encode()
f = c.files.create(file=("batch_input.jsonl", io.BytesIO(data)), purpose="batch")
b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
deadline = time.monotonic() + 60
while b.status == "validating":
    assert time.monotonic() < deadline, "still validating"
    time.sleep(0.05)
    b = c.batches.retrieve(b.id)
assert b.status in ("in_progress", "finalizing", "completed"), (b.status, b.errors)
assert b.request_counts.total == 95 and b.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
emit(batch=b.id, lines=95, bytes=len(data))
