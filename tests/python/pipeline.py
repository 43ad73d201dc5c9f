"""Shared checks of finished batches: download both files and prove every input line appears
exactly once across them, with counts and usage that match the files."""

import collections
import io
import json
import time

from nstest import client

c = client()


def upload_lines(lines):
    data = ("\n".join(json.dumps(l) for l in lines) + "\n").encode()
    return c.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def chat_line(cid, sim=None, model="sim-chat", content=None):
    body = {"model": model, "messages": [{"role": "user", "content": content or f"say {cid}"}], "max_tokens": 16}
    if sim is not None:
        body["sim"] = sim
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def wait(batch_id, statuses, deadline_s=120, on_poll=None):
    deadline = time.monotonic() + deadline_s
    while True:
        b = c.batches.retrieve(batch_id)
        if on_poll:
            on_poll(b)
        if b.status in statuses:
            return b
        assert time.monotonic() < deadline, f"{batch_id} still {b.status} after {deadline_s}s: {b.request_counts}"
        time.sleep(0.1)


def read_file(file_id):
    if file_id is None:
        return []
    meta = c.files.retrieve(file_id)
    assert meta.purpose == "batch_output", meta
    text = c.files.content(file_id).text
    assert text == "" or text.endswith("\n"), "file does not end in a newline"
    lines = text.split("\n")[:-1]
    assert all(lines), "blank line in a result file"
    assert meta.bytes == len(text.encode()), (meta.bytes, len(text.encode()))
    return [json.loads(l) for l in lines]


def check_exactly_once(batch, input_ids):
    """Returns (output lines, error lines) after checking the contract."""
    out = read_file(batch.output_file_id)
    err = read_file(batch.error_file_id)
    seen = collections.Counter(l["custom_id"] for l in out + err)
    dupes = [k for k, v in seen.items() if v > 1]
    assert not dupes, f"duplicated custom_ids: {dupes[:5]}"
    assert set(seen) == set(input_ids), f"missing {set(input_ids) - set(seen)}; extra {set(seen) - set(input_ids)}"
    for l in out:
        assert set(l) == {"id", "custom_id", "response", "error"}, l.keys()
        assert l["id"].startswith("batch_req_") and l["error"] is None
        assert 200 <= l["response"]["status_code"] < 300 and isinstance(l["response"]["body"], dict), l
    for l in err:
        assert set(l) == {"id", "custom_id", "response", "error"}, l.keys()
        if l["response"] is None:
            assert set(l["error"]) >= {"code", "message"}, l
        else:
            assert l["error"] is None and not (200 <= l["response"]["status_code"] < 300), l
    rc = batch.request_counts
    assert (rc.total, rc.completed, rc.failed) == (len(input_ids), len(out), len(err)), (rc, len(out), len(err))
    assert (batch.output_file_id is None) == (len(out) == 0), batch
    assert (batch.error_file_id is None) == (len(err) == 0), batch
    # usage is the sum over successful responses
    inp = sum(l["response"]["body"]["usage"]["prompt_tokens"] for l in out)
    outp = sum(l["response"]["body"]["usage"].get("completion_tokens", 0) for l in out)
    u = batch.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (inp, outp, inp + outp), (u, inp, outp)
    for fid, kind in [(batch.output_file_id, "output"), (batch.error_file_id, "error")]:
        if fid:
            assert c.files.retrieve(fid).filename == f"{batch.id}_{kind}.jsonl"
    return out, err
