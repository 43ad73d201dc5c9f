"""Tenant B attacks tenant A's objects with A's ids: every batch route, every file route of
A's batch output, a batch created on A's input file. Each is indistinguishable from an id that
never existed (404, or for a batch's input the same validation failure), and A's objects are
untouched. (files_isolation.py covers A's uploaded file on the file routes.)"""

import io
import json
import os
import time

from nstest import check_envelope, client, emit, expect_sdk_error, openai, raw

KEY_A, KEY_B = os.environ["NS_API_KEY"], os.environ["NS_OTHER_API_KEY"]
a, b = client(KEY_A), client(KEY_B)
CHAT = "/v1/chat/completions"


def line(cid):
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": 8}
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body}).encode() + b"\n"


def wait(c, batch_id, statuses, deadline_s=60):
    deadline = time.monotonic() + deadline_s
    while True:
        got = c.batches.retrieve(batch_id)
        if got.status in statuses:
            return got
        assert time.monotonic() < deadline, f"{batch_id} still {got.status}"
        time.sleep(0.05)


fa = a.files.create(file=("a.jsonl", io.BytesIO(line("a-1") + line("a-2"))), purpose="batch")
ba = a.batches.create(input_file_id=fa.id, endpoint=CHAT, completion_window="24h")
done = wait(a, ba.id, {"completed"})
out_id = done.output_file_id
assert out_id, done
a_output = a.files.content(out_id).content

# B's own batch, so its list is not empty by accident.
fb = b.files.create(file=("b.jsonl", io.BytesIO(line("b-1"))), purpose="batch")
bb = b.batches.create(input_file_id=fb.id, endpoint=CHAT, completion_window="24h")

# Every batch route: 404, worded as for an id that never existed.
never = "batch_" + "0" * 24
for target in (ba.id, never):
    for fn in (lambda: b.batches.retrieve(target), lambda: b.batches.cancel(target)):
        e = expect_sdk_error(openai.NotFoundError, fn, 404)
        assert e.body["message"] == f"No such Batch object: {target}", e.body
    for method, path in (("GET", f"/v1/batches/{target}"), ("POST", f"/v1/batches/{target}/cancel")):
        check_envelope(raw(method, path, key=KEY_B), 404, "invalid_request_error")
# Lists: B sees its own batch only; A's id as a cursor leads nowhere.
assert [x.id for x in b.batches.list().data] == [bb.id]
assert b.batches.list(after=ba.id).data == []
assert ba.id in [x.id for x in a.batches.list().data]

# A's output file: hidden on every file route, and from B's list.
for fn in (lambda: b.files.retrieve(out_id), lambda: b.files.content(out_id), lambda: b.files.delete(out_id)):
    e = expect_sdk_error(openai.NotFoundError, fn, 404, param="id")
    assert e.body["message"] == f"No such File object: {out_id}", e.body
for method, path in (("GET", f"/v1/files/{out_id}"), ("GET", f"/v1/files/{out_id}/content"),
                     ("DELETE", f"/v1/files/{out_id}")):
    check_envelope(raw(method, path, key=KEY_B), 404, "invalid_request_error")
# a ranged read reveals nothing either
check_envelope(raw("GET", f"/v1/files/{out_id}/content", key=KEY_B, headers={"Range": "bytes=0-0"}), 404)
assert out_id not in [f.id for f in b.files.list()]
assert out_id not in [f.id for f in b.files.list(purpose="batch_output")]

# A batch of B's on A's input file fails exactly as one on a file that never existed.
never_file = "file-" + "0" * 24
failures = {}
for target in (fa.id, never_file):
    bx = b.batches.create(input_file_id=target, endpoint=CHAT, completion_window="24h")
    got = wait(b, bx.id, {"failed", "completed", "in_progress"})
    assert got.status == "failed", got
    assert got.request_counts.total == 0, got
    errs = got.errors.data
    assert len(errs) == 1 and errs[0].param == "input_file_id", errs
    failures[target] = errs[0].message.replace(target, "<id>")
    assert got.output_file_id is None and got.error_file_id is None, got
assert failures[fa.id] == failures[never_file], failures

# A's objects are untouched by all of it.
assert a.batches.retrieve(ba.id).status == "completed"
assert a.files.content(out_id).content == a_output
assert a.files.retrieve(fa.id).id == fa.id
wait(b, bb.id, {"completed"})
emit(a_batch=ba.id, a_output=out_id, b_batch=bb.id)
