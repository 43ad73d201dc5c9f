"""The Files API through the official SDK: upload, retrieve, list (purpose/limit/order/after),
download byte for byte, delete — every field as docs/openai-compat.md says."""

import io
import time

from nstest import ORIGIN, client, emit, expect_sdk_error, openai, raw

c = client()

lines = [
    '{"custom_id": "request-0", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {"model": "m", "messages": [{"role": "user", "content": "héllo ✓"}]}}',
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", '
    '"body": {"model": "m", "messages": [{"role": "user", "content": "two"}]}}',
]
content = ("\n".join(lines) + "\n").encode()

# Upload the way seed 001 does (an open file), and as raw bytes (the SDK names it "upload").
before = int(time.time())
with open(__file__.replace("files_roundtrip.py", "fixtures/batch_input.jsonl"), "rb") as f:
    seed_file = c.files.create(file=f, purpose="batch")
assert seed_file.filename == "batch_input.jsonl", seed_file
f1 = c.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
assert f1.object == "file"
assert f1.id.startswith("file-"), f1.id
assert f1.bytes == len(content), (f1.bytes, len(content))
assert f1.filename == "input.jsonl"
assert f1.purpose == "batch"
assert f1.status == "processed"
assert f1.status_details is None
assert before - 1 <= f1.created_at <= int(time.time()) + 1
# batch inputs expire after 30 days by default
assert f1.expires_at == f1.created_at + 30 * 24 * 3600, (f1.created_at, f1.expires_at)

# Every key is present in the JSON, null where unset.
r = raw("GET", f"/v1/files/{f1.id}")
assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
assert set(r.json()) == {"id", "object", "bytes", "created_at", "expires_at", "filename",
                         "purpose", "status", "status_details"}, r.json()
assert r.headers.get("x-request-id")

# Other purposes never expire unless asked; expires_after is honoured.
f2 = c.files.create(file=("notes.txt", io.BytesIO(b"plain text, not jsonl")), purpose="user_data")
assert f2.expires_at is None and f2.purpose == "user_data"
f3 = c.files.create(
    file=("exp.jsonl", io.BytesIO(content)),
    purpose="batch",
    expires_after={"anchor": "created_at", "seconds": 3600},
)
assert f3.expires_at == f3.created_at + 3600

# Retrieve.
got = c.files.retrieve(f1.id)
assert got == f1, (got, f1)

# Download, byte for byte (also with the Accept header the SDK may send).
assert c.files.content(f1.id).content == content
r = raw("GET", f"/v1/files/{f1.id}/content", headers={"Accept": "application/binary"})
assert r.status_code == 200 and r.content == content
assert r.headers["content-type"] == "application/octet-stream"
assert int(r.headers["content-length"]) == len(content)
# Ranges.
r = raw("GET", f"/v1/files/{f1.id}/content", headers={"Range": "bytes=0-9"})
assert r.status_code == 206 and r.content == content[:10], (r.status_code, r.content)
assert r.headers["content-range"] == f"bytes 0-9/{len(content)}"
r = raw("GET", f"/v1/files/{f1.id}/content", headers={"Range": "bytes=-5"})
assert r.status_code == 206 and r.content == content[-5:]
r = raw("GET", f"/v1/files/{f1.id}/content", headers={"Range": f"bytes={len(content)}-"})
assert r.status_code == 416, r.status_code
assert r.headers["content-range"] == f"bytes */{len(content)}"
assert r.json()["error"]["type"] == "invalid_request_error"

# List: newest first by default; purpose filter; limit/order/after.
all_ids = [f.id for f in c.files.list()]
assert all_ids == [f3.id, f2.id, f1.id, seed_file.id], all_ids
assert [f.id for f in c.files.list(purpose="batch")] == [f3.id, f1.id, seed_file.id]
assert [f.id for f in c.files.list(purpose="user_data")] == [f2.id]
assert [f.id for f in c.files.list(order="asc")] == list(reversed(all_ids))
page = c.files.list(limit=2)
assert [f.id for f in page.data] == all_ids[:2]
assert page.has_more is True
body = raw("GET", "/v1/files?limit=2").json()
assert set(body) == {"object", "data", "first_id", "last_id", "has_more"}, body
assert body["object"] == "list" and body["first_id"] == all_ids[0] and body["last_id"] == all_ids[1]
page2 = c.files.list(limit=2, after=all_ids[1])
assert [f.id for f in page2.data] == all_ids[2:] and page2.has_more is False
# the SDK's auto-pagination walks every page exactly once
walked = [f.id for f in c.files.list(limit=1)]
assert walked == all_ids, walked
# an unknown cursor: an empty page
empty = raw("GET", "/v1/files?after=file-doesnotexist").json()
assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}, empty

# The same API without /v1 and under /v1/openai (seed 001's prefix).
root_client = client(base_url=ORIGIN)
assert root_client.files.retrieve(f1.id).id == f1.id
alias_client = client(base_url=ORIGIN + "/v1/openai")
assert [f.id for f in alias_client.files.list()] == all_ids

# Delete, then it is gone everywhere.
deleted = c.files.delete(f1.id)
assert deleted.id == f1.id and deleted.deleted is True and deleted.object == "file"
r = raw("DELETE", f"/v1/files/{f2.id}")
assert r.json() == {"id": f2.id, "object": "file", "deleted": True}, r.json()
expect_sdk_error(openai.NotFoundError, lambda: c.files.retrieve(f1.id), 404, param="id")
expect_sdk_error(openai.NotFoundError, lambda: c.files.content(f1.id), 404)
expect_sdk_error(openai.NotFoundError, lambda: c.files.delete(f1.id), 404)
assert [f.id for f in c.files.list()] == [f3.id, seed_file.id]

emit(remaining=[f3.id, seed_file.id], deleted=[f1.id, f2.id])
