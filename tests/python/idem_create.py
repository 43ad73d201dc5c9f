"""Idempotency-Key on POST /v1/files and POST /v1/batches, through the official SDK (which sends
no such header by itself: its `_idempotency_header` is None in the OpenAI client, so keys go in
`extra_headers`).

NS_PHASE:
- `all`: the same key twice gives the same object and creates nothing; the same key with
  another request (or on the other route) is a 409 `idempotency_key_reused` that the SDK does
  not retry; malformed keys are 400s; 8 concurrent requests with one key make one object and
  all get it. Reports the tenant's file ids, to compare with object storage.
- `first` / `second`: a file and a batch made with NS_KEY_PREFIX keys (first), then the same
  requests again against another gateway (second): the same objects come back.
"""

import concurrent.futures
import io
import json
import os
import uuid

import openai

from nstest import check_envelope, client, emit, expect_sdk_error, raw

c = client()
PHASE = os.environ.get("NS_PHASE", "all")
RUN = os.environ.get("NS_KEY_PREFIX") or uuid.uuid4().hex


def upload(key, data, filename="input.jsonl"):
    return c.files.create(
        file=(filename, io.BytesIO(data)),
        purpose="batch",
        extra_headers={"Idempotency-Key": key} if key else None,
    )


def create_batch(key, file_id, metadata=None):
    return c.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata,
        extra_headers={"Idempotency-Key": key} if key else None,
    )


def line(cid):
    # A model no upstream serves: the batches fail validation and write no result files, so
    # storage holds exactly the uploads (the Rust side compares them with the files listed).
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": cid}], "max_tokens": 8}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


DATA = ("\n".join(line(f"r{i}") for i in range(3)) + "\n").encode()


def all_files():
    return [f for f in c.files.list(limit=10000).data]


def all_batches():
    return list(c.batches.list(limit=100).data)


def phase_all():
    # --- files: a retry with the key returns the first file and stores nothing new
    f1 = upload(f"{RUN}-file", DATA, "same.jsonl")
    f2 = upload(f"{RUN}-file", DATA, "same.jsonl")
    assert f1.id == f2.id, (f1, f2)
    assert f1.model_dump() == f2.model_dump(), (f1, f2)
    assert [f.id for f in all_files() if f.filename == "same.jsonl"] == [f1.id]
    # another request with that key: other bytes, another name, another purpose
    for other in [
        lambda: upload(f"{RUN}-file", DATA + line("extra").encode() + b"\n", "same.jsonl"),
        lambda: upload(f"{RUN}-file", DATA, "other.jsonl"),
        lambda: c.files.create(file=("same.jsonl", io.BytesIO(DATA)), purpose="user_data",
                               extra_headers={"Idempotency-Key": f"{RUN}-file"}),
    ]:
        expect_sdk_error(openai.ConflictError, other, 409, param="Idempotency-Key", code="idempotency_key_reused")
    resp = raw("POST", "/v1/files", files={"file": ("same.jsonl", b"{}\n")}, data={"purpose": "batch"},
               headers={"Idempotency-Key": f"{RUN}-file"})
    check_envelope(resp, 409, "invalid_request_error", param="Idempotency-Key", code="idempotency_key_reused")
    assert resp.headers.get("x-should-retry") == "false", resp.headers
    # without a key, the same upload makes another file
    f3 = upload(None, DATA, "same.jsonl")
    assert f3.id != f1.id

    # --- batches
    b1 = create_batch(f"{RUN}-batch", f1.id, {"k": "v"})
    b2 = create_batch(f"{RUN}-batch", f1.id, {"k": "v"})
    assert b1.id == b2.id, (b1, b2)
    # key order and spacing do not make another request
    resp = raw("POST", "/v1/batches", headers={"Idempotency-Key": f"{RUN}-batch", "Content-Type": "application/json"},
               content=json.dumps({"metadata": {"k": "v"}, "completion_window": "24h",
                                   "endpoint": "/v1/chat/completions", "input_file_id": f1.id}, indent=2))
    assert resp.status_code == 200 and resp.json()["id"] == b1.id, resp.text
    expect_sdk_error(openai.ConflictError, lambda: create_batch(f"{RUN}-batch", f1.id, {"k": "w"}), 409,
                     code="idempotency_key_reused")
    # a key of one route is not another route's
    expect_sdk_error(openai.ConflictError, lambda: create_batch(f"{RUN}-file", f1.id), 409,
                     code="idempotency_key_reused")
    expect_sdk_error(openai.ConflictError, lambda: upload(f"{RUN}-batch", DATA), 409,
                     code="idempotency_key_reused")
    assert [b.id for b in all_batches()] == [b1.id], all_batches()

    # --- malformed keys: 400 before anything is read or stored
    for bad in ["k" * 256, "a\tb", ""]:
        resp = raw("POST", "/v1/batches", headers={"Idempotency-Key": bad},
                   json={"input_file_id": f1.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        check_envelope(resp, 400, "invalid_request_error", param="Idempotency-Key", code="invalid_idempotency_key")
        resp = raw("POST", "/v1/files", files={"file": ("x.jsonl", DATA)}, data={"purpose": "batch"},
                   headers={"Idempotency-Key": bad})
        check_envelope(resp, 400, "invalid_request_error", param="Idempotency-Key", code="invalid_idempotency_key")
    resp = raw("POST", "/v1/batches", headers={"Idempotency-Key": "k" * 255},
               json={"input_file_id": f1.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert resp.status_code == 200, resp.text

    # --- 8 at once with one key: one object, and every request gets it
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        files = list(pool.map(lambda _: upload(f"{RUN}-race-file", DATA, "race.jsonl"), range(8)))
        assert len({f.id for f in files}) == 1, [f.id for f in files]
        batches = list(pool.map(lambda _: create_batch(f"{RUN}-race-batch", files[0].id), range(8)))
        assert len({b.id for b in batches}) == 1, [b.id for b in batches]
    assert [f.id for f in all_files() if f.filename == "race.jsonl"] == [files[0].id]
    assert sum(1 for b in all_batches() if b.id == batches[0].id) == 1
    assert len(all_batches()) == 3, all_batches()
    emit(ok=True, file_ids=sorted(f.id for f in all_files()))


def phase_restart(second):
    f = upload(f"{RUN}-file", DATA, "restart.jsonl")
    b = create_batch(f"{RUN}-batch", f.id)
    if second:
        assert [x.id for x in all_files()] == [f.id], all_files()
        assert [x.id for x in all_batches()] == [b.id], all_batches()
    emit(ok=True, file_id=f.id, batch_id=b.id)


if PHASE == "all":
    phase_all()
else:
    phase_restart(PHASE == "second")
