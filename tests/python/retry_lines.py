"""POST /v1/batches/{id}/retry: a new batch of exactly the failed lines of an ended batch,
through the official SDK's raw-request helper (`client.post(..., cast_to=Batch)`, strict
validation of the Batch object it returns).

A batch of 10 lines where 5 fail (an upstream 400, two 429s, a 500, a 503) is retried: all
failed lines, then only the 429s (`status_codes: [429]`), the 5xx (`"5xx"`) and the
`rate_limit_exceeded` error code. Each retry's input file holds exactly the selected input
lines, byte for byte and in input order; it keeps the endpoint and window, names its parent in
`metadata.retry_of`, runs to its end, and is listed by `GET /v1/batches?retry_of=`. The errors:
a running batch (409), another tenant's (404), a batch without failures (400
`nothing_to_retry`), a filter that matches nothing (the retry fails with `nothing_to_retry`);
an Idempotency-Key makes a retried retry return the same batch.
"""

import json
import os

import openai
from openai.types import Batch

from nstest import check_envelope, client, emit, expect_sdk_error, raw
from pipeline import c, chat_line, read_file, upload_lines, wait

ENDED = {"completed", "failed", "expired", "cancelled"}
other = client(os.environ["NS_OTHER_KEY"])


def retry(batch_id, body=None, cl=c, headers=None):
    return cl.post(f"/batches/{batch_id}/retry", body=body or {}, cast_to=Batch,
                   options={"headers": headers} if headers else {})


def input_lines(file_id):
    text = c.files.content(file_id).text
    assert text.endswith("\n"), text
    return text.split("\n")[:-1]


# ok-0 is slow, so the batch is certainly still running when it is first retried
lines = [chat_line("ok-0", sim={"latency_ms": 1500})] + [chat_line(f"ok-{i}") for i in range(1, 5)] + [
    chat_line("bad-400", sim={"status": 400}),
    chat_line("rl-0", sim={"status": 429, "retry_after": 0}),
    chat_line("srv-500", sim={"status": 500}),
    chat_line("rl-1", sim={"status": 429, "retry_after": 0}),
    chat_line("srv-503", sim={"status": 503}),
]
parent = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions",
                          completion_window="1h", metadata={"team": "ml"})
# not ended yet: a 409 the SDK is told not to retry
resp = raw("POST", f"/v1/batches/{parent.id}/retry", json={})
check_envelope(resp, 409, "invalid_request_error")
assert resp.headers.get("x-should-retry") == "false", resp.headers
parent = wait(parent.id, ENDED)
assert parent.status == "completed", parent
assert parent.request_counts.failed == 5, parent.request_counts
original = input_lines(parent.input_file_id)
by_id = {json.loads(l)["custom_id"]: l for l in original}


def check_child(child, custom_ids, window="1h"):
    assert child.metadata["retry_of"] == parent.id, child.metadata
    assert child.endpoint == parent.endpoint and child.completion_window == window, child
    done = wait(child.id, ENDED)
    assert done.status == "completed", done
    got = input_lines(done.input_file_id)
    # exactly the selected input lines, byte for byte, in input order
    assert got == [l for l in original if json.loads(l)["custom_id"] in custom_ids], got
    meta = c.files.retrieve(done.input_file_id)
    assert meta.purpose == "batch", meta
    assert done.request_counts.total == len(custom_ids), done.request_counts
    # the same lines fail again the same way (the directives are in the bodies)
    err = read_file(done.error_file_id)
    assert sorted(l["custom_id"] for l in err) == sorted(custom_ids), err
    return done


failed_ids = {"bad-400", "rl-0", "srv-500", "rl-1", "srv-503"}
everything = retry(parent.id)
assert everything.status == "validating", everything
assert everything.metadata == {"team": "ml", "retry_of": parent.id}, everything.metadata
check_child(everything, failed_ids)

only_429 = retry(parent.id, {"status_codes": [429], "metadata": {"why": "429s"}})
assert only_429.metadata == {"why": "429s", "retry_of": parent.id}, only_429.metadata
check_child(only_429, {"rl-0", "rl-1"})
check_child(retry(parent.id, {"status_codes": ["5xx"], "completion_window": "24h"}),
            {"srv-500", "srv-503"}, window="24h")
check_child(retry(parent.id, {"error_codes": ["rate_limit_exceeded"], "status_codes": [400]}),
            {"rl-0", "rl-1", "bad-400"})

# a filter that matches no failed line: the retry fails, saying so
none = wait(retry(parent.id, {"error_codes": ["batch_expired"]}).id, ENDED)
assert none.status == "failed", none
assert none.errors.data[0].code == "nothing_to_retry", none.errors

# the parent lists its retries (newest first), and only its
listed = [b.id for b in c.batches.list(extra_query={"retry_of": parent.id}).data]
assert len(listed) == 5 and none.id == listed[0] and everything.id == listed[-1], listed
assert [b.id for b in c.batches.list(extra_query={"retry_of": everything.id}).data] == []

# an Idempotency-Key: the same retry twice is one batch; another body with it is a 409
k = {"Idempotency-Key": f"retry-{parent.id}"}
a = retry(parent.id, {"status_codes": [429]}, headers=k)
b = retry(parent.id, {"status_codes": [429]}, headers=k)
assert a.id == b.id, (a.id, b.id)
expect_sdk_error(openai.ConflictError, lambda: retry(parent.id, {"status_codes": [500]}, headers=k), 409,
                 code="idempotency_key_reused")
wait(a.id, ENDED)

# errors: another tenant's batch, no such batch, nothing failed, bad bodies
expect_sdk_error(openai.NotFoundError, lambda: retry(parent.id, cl=other), 404)
expect_sdk_error(openai.NotFoundError, lambda: retry("batch_nope"), 404)
clean = wait(c.batches.create(input_file_id=upload_lines([chat_line("fine")]), endpoint="/v1/chat/completions",
                              completion_window="24h").id, ENDED)
assert clean.status == "completed" and clean.request_counts.failed == 0, clean
expect_sdk_error(openai.BadRequestError, lambda: retry(clean.id), 400, code="nothing_to_retry")
for body, param in [({"status_codes": [42]}, "status_codes"), ({"status_codes": ["6xx"]}, "status_codes"),
                    ({"error_codes": [""]}, "error_codes"), ({"completion_window": "2h"}, "completion_window"),
                    ({"nope": 1}, "nope")]:
    resp = raw("POST", f"/v1/batches/{parent.id}/retry", json=body)
    check_envelope(resp, 400, "invalid_request_error", param=param)

emit(ok=True, parent=parent.id, retries=listed)
