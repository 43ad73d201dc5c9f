"""The Batches API's control plane through the official SDK (strict): synchronous parameter
checks, asynchronous validation with every error code, the Batch object's shape, cancel, and
cursor pagination."""

import io
import json
import os
import time

from nstest import check_envelope, client, emit, expect_sdk_error, openai, raw

c = client()
CHAT = "/v1/chat/completions"
MAX_LINES = int(os.environ["NS_MAX_LINES"])
MAX_FILE = int(os.environ["NS_MAX_FILE_BYTES"])
BATCH_KEYS = {"id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
              "status", "output_file_id", "error_file_id", "created_at", "in_progress_at",
              "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage"}
ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


def line(cid, model="sim-chat", url=CHAT, method="POST", body=None, **extra):
    body = body if body is not None else {"model": model, "messages": [{"role": "user", "content": cid}]}
    obj = {"custom_id": cid, "method": method, "url": url, "body": body, **extra}
    return json.dumps(obj)


def upload(lines, purpose="batch"):
    data = ("\n".join(lines) + "\n").encode()
    return c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose=purpose).id


def wait_until(batch_id, statuses, deadline_s=60):
    deadline = time.monotonic() + deadline_s
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.monotonic() < deadline, f"{batch_id} still {b.status} after {deadline_s}s"
        time.sleep(0.05)


def create(file_id, endpoint=CHAT, **kw):
    return c.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h", **kw)


# --- synchronous parameter checks (400, param named)
# slow requests (2 s each): the batch is surely still running when it is cancelled below
slow = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}], "sim": {"latency_ms": 2000}}
good_file = upload([line(f"r{i}", body=slow) for i in range(25)])
for body, param, code in [
    ({"endpoint": CHAT, "completion_window": "24h"}, "input_file_id", "missing_required_parameter"),
    ({"input_file_id": good_file, "completion_window": "24h"}, "endpoint", "missing_required_parameter"),
    ({"input_file_id": good_file, "endpoint": CHAT}, "completion_window", "missing_required_parameter"),
    ({"input_file_id": good_file, "endpoint": "/v1/images/generations", "completion_window": "24h"}, "endpoint", "invalid_value"),
    ({"input_file_id": good_file, "endpoint": CHAT, "completion_window": "48h"}, "completion_window", "invalid_value"),
    ({"input_file_id": good_file, "endpoint": CHAT, "completion_window": "24h", "metadata": {"k": 1}}, "metadata.k", "invalid_type"),
    ({"input_file_id": good_file, "endpoint": CHAT, "completion_window": "24h", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
    ({"input_file_id": good_file, "endpoint": CHAT, "completion_window": "24h", "output_expires_after": {"anchor": "created_at", "seconds": 5}}, "output_expires_after.seconds", "invalid_value"),
    ({"input_file_id": good_file, "endpoint": CHAT, "completion_window": "24h", "surprise": True}, "surprise", "unknown_parameter"),
]:
    check_envelope(raw("POST", "/v1/batches", json=body), 400, "invalid_request_error", param, code)
check_envelope(raw("POST", "/v1/batches", content=b"{not json", headers={"Content-Type": "application/json"}), 400,
               "invalid_request_error")
expect_sdk_error(openai.BadRequestError,
                 lambda: c.batches.create(input_file_id=good_file, endpoint="/v1/nope", completion_window="24h"),
                 400, param="endpoint", code="invalid_value")

# --- a good input: validating → in_progress with total and model; every key present
b = create(good_file, metadata={"description": "nightly eval run"},
           output_expires_after={"anchor": "created_at", "seconds": 604800})
assert b.status == "validating" and b.object == "batch" and b.id.startswith("batch_"), b
assert b.expires_at == b.created_at + 24 * 3600, b
assert b.metadata == {"description": "nightly eval run"}
assert b.request_counts is not None and b.request_counts.total == 0
assert b.usage.model_dump() == ZERO_USAGE, b.usage
body = raw("GET", f"/v1/batches/{b.id}").json()
assert set(body) == BATCH_KEYS, set(body) ^ BATCH_KEYS
assert set(body["usage"]) == set(ZERO_USAGE), body["usage"]
running = wait_until(b.id, {"in_progress", "failed"})
assert running.status == "in_progress", running.errors
assert running.request_counts.total == 25 and running.model == "sim-chat", running
assert running.in_progress_at is not None and running.errors is None
# cancel: cancelling at once (and idempotent)
cancelled = c.batches.cancel(b.id)
assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None, cancelled
again = c.batches.cancel(b.id)
assert again.status in ("cancelling", "cancelled") and again.cancelling_at == cancelled.cancelling_at

# --- asynchronous validation: every error code, 1-based lines, the right params
cases = [
    ([line("a"), "not json"], [("invalid_json_line", 2, None)]),
    ([line("a"), "", line("b")], [("invalid_json_line", 2, None)]),
    ([json.dumps({"method": "POST", "url": CHAT, "body": {"model": "sim-chat", "messages": []}})],
     [("missing_required_parameter", 1, "custom_id")]),
    ([line("a", method="GET")], [("invalid_value", 1, "method")]),
    ([line("a"), line("b", url="/v1/embeddings")], [("invalid_url", 2, "url")]),
    ([line("a"), line("b"), line("a")], [("duplicate_custom_id", 3, "custom_id")]),
    ([line("a", body={"model": "sim-chat", "messages": [], "stream": True})], [("streaming_unsupported", 1, "body.stream")]),
    ([line("a", body={"messages": []})], [("invalid_request", 1, "body.model")]),
    ([line("a"), line("b", model="sim-embed")], [("model_mismatch", 2, "body.model")]),
    ([line("a", model="no-such-model")], [("model_not_found", 1, "body.model")]),
    ([line(f"r{i}") for i in range(MAX_LINES + 1)], [("too_many_tasks", None, None)]),
]
for lines_, expected in cases:
    bid = create(upload(lines_)).id
    failed = wait_until(bid, {"failed", "in_progress"})
    assert failed.status == "failed", (lines_[:3], failed)
    assert failed.failed_at is not None and failed.in_progress_at is None
    got = [(e.code, e.line, e.param) for e in failed.errors.data]
    for exp in expected:
        assert exp in got, (exp, got)
    assert failed.errors.object == "list"
    assert failed.output_file_id is None and failed.error_file_id is None

# a file over the batch size limit (but under the upload limit)
pad = "x" * 1000
big = upload([line(f"r{i}", body={"model": "sim-chat", "messages": [], "pad": pad}) for i in range(MAX_FILE // 1000 + 10)])
failed = wait_until(create(big).id, {"failed", "in_progress"})
assert failed.status == "failed" and "file_too_large" in [e.code for e in failed.errors.data], failed

# unknown and wrong-purpose input files fail asynchronously, naming input_file_id
for fid in ["file-doesnotexist", c.files.create(file=("n.jsonl", io.BytesIO(line("a").encode())), purpose="user_data").id]:
    bid = create(fid).id
    failed = wait_until(bid, {"failed"})
    e = failed.errors.data[0]
    assert (e.code, e.line, e.param) == ("invalid_request", None, "input_file_id"), e

# cancelling a batch that ended is a 409 the SDK must not retry
r = raw("POST", f"/v1/batches/{bid}/cancel")
check_envelope(r, 409, "invalid_request_error", contains="cannot cancel a batch with status 'failed'")
assert r.headers.get("x-should-retry") == "false", r.headers
expect_sdk_error(openai.ConflictError, lambda: c.batches.cancel(bid), 409)

# unknown ids are 404s with the OpenAI message
for path in ["/v1/batches/batch_nope", "/v1/batches/file-wrongkind"]:
    check_envelope(raw("GET", path), 404, "invalid_request_error", "id")
check_envelope(raw("POST", "/v1/batches/batch_nope/cancel"), 404, "invalid_request_error", "id")
check_envelope(raw("GET", "/v1/batches?limit=101"), 400, "invalid_request_error", "limit", "invalid_value")
check_envelope(raw("GET", "/v1/batches?limit=0"), 400, "invalid_request_error", "limit", "invalid_value")
check_envelope(raw("DELETE", "/v1/batches/batch_x"), 405, "invalid_request_error")
emit(ok=True)
