"""Tenants are isolated: another tenant's file is a 404 everywhere, and lists never show it."""

import io
import os

from nstest import check_envelope, client, emit, expect_sdk_error, openai, raw

a = client(os.environ["NS_API_KEY"])
b = client(os.environ["NS_OTHER_API_KEY"])
line = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": "hi"}}\n'

fa = a.files.create(file=("a.jsonl", io.BytesIO(line)), purpose="batch")
fb = b.files.create(file=("b.jsonl", io.BytesIO(line)), purpose="batch")

assert [f.id for f in a.files.list()] == [fa.id]
assert [f.id for f in b.files.list()] == [fb.id]
for fn in (lambda: b.files.retrieve(fa.id), lambda: b.files.content(fa.id), lambda: b.files.delete(fa.id)):
    e = expect_sdk_error(openai.NotFoundError, fn, 404, param="id")
    # indistinguishable from a file that never existed
    assert e.body["message"] == f"No such File object: {fa.id}", e.body
check_envelope(raw("GET", f"/v1/files/{fa.id}/content", key=os.environ["NS_OTHER_API_KEY"]), 404)
# a cursor of another tenant's file leads nowhere
assert b.files.list(after=fa.id).data == []
# A's file is untouched by B's attempts
assert a.files.content(fa.id).content == line
emit(a=fa.id, b=fb.id)
