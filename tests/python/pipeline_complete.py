"""A batch runs to `completed` against the simulator: every custom_id once, content from the
simulator, counts, usage and model right; mixed upstream outcomes land in the right file."""

import json

from nstest import emit
from pipeline import c, chat_line, check_exactly_once, upload_lines, wait

# --- all succeed (50 lines, several chunks)
lines = [chat_line(f"ok-{i}") for i in range(50)]
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"})
assert done.status == "completed", done
assert done.model == "sim-chat" and done.completed_at and done.finalizing_at and done.in_progress_at
out, err = check_exactly_once(done, [l["custom_id"] for l in lines])
assert len(out) == 50 and done.error_file_id is None
assert all(l["response"]["body"]["choices"][0]["message"]["content"] for l in out)
assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0

# --- mixed: success, upstream 400, a 503 that succeeds on retry, 503s that exhaust retries
mixed = (
    [chat_line(f"good-{i}") for i in range(5)]
    + [chat_line(f"bad-{i}", sim={"status": 400}) for i in range(3)]
    + [chat_line(f"flaky-{i}", sim={"fail_times": 1, "status": 503}) for i in range(4)]
    + [chat_line(f"down-{i}", sim={"status": 503}) for i in range(2)]
)
b = c.batches.create(input_file_id=upload_lines(mixed), endpoint="/v1/chat/completions", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"})
assert done.status == "completed", done
out, err = check_exactly_once(done, [l["custom_id"] for l in mixed])
ok_ids = {l["custom_id"] for l in out}
assert ok_ids == {f"good-{i}" for i in range(5)} | {f"flaky-{i}" for i in range(4)}, ok_ids
by_id = {l["custom_id"]: l for l in err}
for i in range(3):
    r = by_id[f"bad-{i}"]["response"]
    assert r["status_code"] == 400 and r["body"]["error"]["type"] == "invalid_request_error", r
for i in range(2):
    assert by_id[f"down-{i}"]["response"]["status_code"] == 503, by_id[f"down-{i}"]

# --- every request fails: completed, with no output file
allbad = [chat_line(f"x-{i}", sim={"status": 400}) for i in range(3)]
b = c.batches.create(input_file_id=upload_lines(allbad), endpoint="/v1/chat/completions", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"})
assert done.status == "completed" and done.output_file_id is None and done.error_file_id, done
check_exactly_once(done, [l["custom_id"] for l in allbad])

# --- embeddings: output_tokens 0
emb = [{"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings",
        "body": {"model": "sim-embed", "input": f"text {i}"}} for i in range(7)]
b = c.batches.create(input_file_id=upload_lines(emb), endpoint="/v1/embeddings", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"})
assert done.status == "completed", done
out, _ = check_exactly_once(done, [l["custom_id"] for l in emb])
assert done.usage.output_tokens == 0 and done.usage.input_tokens > 0
assert all(l["response"]["body"]["data"][0]["embedding"] for l in out)

# cancelling a completed batch: 409, not retryable
from nstest import check_envelope, raw
r = raw("POST", f"/v1/batches/{done.id}/cancel")
check_envelope(r, 409, "invalid_request_error", contains="cannot cancel a batch with status 'completed'")
assert r.headers.get("x-should-retry") == "false"
emit(ok=True)
