"""Every client mistake on the Files API is a 4xx in OpenAI's envelope with the right
param/code, and leaves nothing behind (the Rust side then checks storage and the database).
The gateway under test has max_upload_bytes = NS_MAX_UPLOAD."""

import http.client
import io
import json
import os
import urllib.parse

from nstest import ORIGIN, check_envelope, client, emit, expect_sdk_error, openai, raw

c = client()
MAX = int(os.environ["NS_MAX_UPLOAD"])
good = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def upload(files=None, data=None, **kw):
    """Always multipart/form-data, even without a file part (as the SDKs send it)."""
    parts = [(k, (None, v)) for k, v in (data or {}).items()]
    parts += list((files or {}).items())
    return raw("POST", "/v1/files", files=parts, **kw)


# --- the multipart form
check_envelope(upload(data={"purpose": "batch"}), 400, "invalid_request_error", "file",
               "missing_required_parameter")
check_envelope(upload(files={"file": ("a.jsonl", good)}), 400, "invalid_request_error",
               "purpose", "missing_required_parameter")
check_envelope(upload(files={"file": ("a.jsonl", good)}, data={"purpose": "nonsense"}), 400,
               "invalid_request_error", "purpose", "invalid_value")
check_envelope(upload(files={"file": ("a.jsonl", good)}, data={"purpose": "batch_output"}), 400,
               param="purpose", code="invalid_value")
# purpose after the file part (the Node SDK's order) is read all the same
r = raw("POST", "/v1/files", files=[("file", ("a.jsonl", good)), ("purpose", (None, "nonsense"))])
check_envelope(r, 400, param="purpose", code="invalid_value")
# not multipart at all / a broken multipart body
check_envelope(raw("POST", "/v1/files", json={"purpose": "batch"}), 400, "invalid_request_error")
check_envelope(
    raw("POST", "/v1/files", content=b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch",
        headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
    400, "invalid_request_error")
check_envelope(
    raw("POST", "/v1/files", content=b"garbage", headers={"Content-Type": "multipart/form-data"}),
    400, "invalid_request_error")

# --- content checks for purpose=batch (the SDK path)
for name, body, code in [
    ("empty", b"", "empty_file"),
    ("latin1", b'{"custom_id": "caf\xe9"}\n', "invalid_file_format"),
    ("prose", b"this is not json\n", "invalid_file_format"),
    ("array", b"[1, 2, 3]\n", "invalid_file_format"),
    ("truncated", b'{"custom_id": \n', "invalid_file_format"),
    ("blank-first", b'\n{"a": 1}\n', "invalid_file_format"),
    # invalid UTF-8 far from the start: caught while streaming
    ("late-bad-utf8", good * 2000 + b"\xff\xfe\n", "invalid_file_format"),
]:
    e = expect_sdk_error(openai.BadRequestError,
                         lambda: c.files.create(file=(f"{name}.jsonl", io.BytesIO(body)), purpose="batch"),
                         400, param="file", code=code)
# an empty file is refused for every purpose
expect_sdk_error(openai.BadRequestError,
                 lambda: c.files.create(file=("e.txt", io.BytesIO(b"")), purpose="user_data"),
                 400, param="file", code="empty_file")
# over the configured limit: refused while streaming, for any purpose
expect_sdk_error(openai.BadRequestError,
                 lambda: c.files.create(file=("big.jsonl", io.BytesIO(good * (MAX // len(good) + 10))), purpose="batch"),
                 400, param="file", code="file_too_large")
expect_sdk_error(openai.BadRequestError,
                 lambda: c.files.create(file=("big.bin", io.BytesIO(b"x" * (MAX + 1))), purpose="user_data"),
                 400, param="file", code="file_too_large")
# a body that announces itself too large is refused before any of it is sent
conn = http.client.HTTPConnection(urllib.parse.urlparse(ORIGIN).netloc, timeout=30)
conn.putrequest("POST", "/v1/files")
conn.putheader("Authorization", f"Bearer {os.environ['NS_API_KEY']}")
conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
conn.putheader("Content-Length", str(MAX * 4))
conn.endheaders()
resp = conn.getresponse()
body = json.loads(resp.read())
assert resp.status == 400, (resp.status, body)
assert body["error"]["param"] == "file" and body["error"]["code"] == "file_too_large", body
conn.close()
# exactly at the limit is fine (and is the one file this script leaves)
at_limit = b"x" * MAX
ok = c.files.create(file=("limit.bin", io.BytesIO(at_limit)), purpose="user_data")
assert ok.bytes == MAX

# --- expires_after
for data, param, code in [
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "10"}, "expires_after.seconds", "invalid_value"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "expires_after.seconds", "invalid_value"),
    ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"}, "expires_after.seconds", "invalid_type"),
    ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "expires_after.anchor", "invalid_value"),
    ({"expires_after[seconds]": "3600"}, "expires_after.anchor", "missing_required_parameter"),
]:
    check_envelope(upload(files={"file": ("a.jsonl", good)}, data={"purpose": "batch", **data}), 400,
                   "invalid_request_error", param, code)

# --- list parameters
for query, param, code in [
    ("limit=0", "limit", "invalid_value"),
    ("limit=10001", "limit", "invalid_value"),
    ("limit=ten", "limit", "invalid_type"),
    ("order=sideways", "order", "invalid_value"),
    ("purpose=nonsense", "purpose", "invalid_value"),
]:
    check_envelope(raw("GET", f"/v1/files?{query}"), 400, "invalid_request_error", param, code)
expect_sdk_error(openai.BadRequestError, lambda: c.files.list(limit=0), 400, param="limit")
# a malformed cursor names no file: an empty page, not an error
r = raw("GET", "/v1/files?after=not-an-id")
assert r.status_code == 200 and r.json()["data"] == [] and r.json()["has_more"] is False, r.text

# --- unknown ids
for path in ["/v1/files/file-nope", "/v1/files/file-nope/content", "/v1/files/batch_wrongkind",
             "/v1/files/%20"]:
    check_envelope(raw("GET", path), 404, "invalid_request_error", "id")
check_envelope(raw("DELETE", "/v1/files/file-nope"), 404, "invalid_request_error", "id")
expect_sdk_error(openai.NotFoundError, lambda: c.files.retrieve("file-nope"), 404, param="id")

# --- authentication
check_envelope(raw("GET", "/v1/files", key=False), 401, "authentication_error")
check_envelope(raw("GET", "/v1/files", key="ns-wrong"), 401, "authentication_error",
               contains="incorrect api key")
check_envelope(raw("POST", "/v1/files", key="ns-wrong", files={"file": ("a.jsonl", good)},
                   data={"purpose": "batch"}), 401, "authentication_error")
expect_sdk_error(openai.AuthenticationError, lambda: client(key="ns-wrong").files.list(), 401)
# x-api-key works as well as Bearer
r = raw("GET", "/v1/files", key=False, headers={"x-api-key": os.environ["NS_API_KEY"]})
assert r.status_code == 200, r.text

# --- wrong method, unknown route
check_envelope(raw("PUT", "/v1/files"), 405, "invalid_request_error")
check_envelope(raw("PATCH", "/v1/files/file-x"), 405, "invalid_request_error")
check_envelope(raw("POST", "/v1/files/file-x/content"), 405, "invalid_request_error")
check_envelope(raw("GET", "/v1/nothing-here"), 404, "invalid_request_error", contains="invalid url")
check_envelope(raw("GET", "/nothing"), 404, "invalid_request_error")

emit(kept=[ok.id])
