"""Expired files (phase 1 uploads; the test moves expires_at into the past; phase 2 checks)
stop being listed and answer 404 everywhere."""

import io
import os

from nstest import client, emit, expect_sdk_error, openai

c = client()
line = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": "hi"}}\n'

if os.environ["NS_PHASE"] == "upload":
    f = c.files.create(file=("soon.jsonl", io.BytesIO(line)), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 3600})
    keep = c.files.create(file=("keep.jsonl", io.BytesIO(line)), purpose="batch")
    assert f.expires_at == f.created_at + 3600
    emit(expiring=f.id, keep=keep.id)
else:
    gone, keep = os.environ["NS_EXPIRED"], os.environ["NS_KEEP"]
    assert [x.id for x in c.files.list()] == [keep]
    for fn in (lambda: c.files.retrieve(gone), lambda: c.files.content(gone), lambda: c.files.delete(gone)):
        expect_sdk_error(openai.NotFoundError, fn, 404, param="id")
    assert c.files.retrieve(keep).id == keep
    emit(ok=True)
