"""Wrong, missing and malformed API keys are a 401 in OpenAI's envelope on every route, before
anything is read or stored; bodies over the limits are refused in the envelope too."""

import os

from nstest import check_envelope, client, emit, raw

KEY = os.environ["NS_API_KEY"]
MAX_JSON = int(os.environ["NS_MAX_JSON"])
FORM = {"files": {"file": ("x.jsonl", b'{"a": 1}\n')}, "data": {"purpose": "batch"}}
ROUTES = [
    ("GET", "/v1/files", {}),
    ("POST", "/v1/files", FORM),
    ("GET", "/v1/files/file-abc", {}),
    ("GET", "/v1/files/file-abc/content", {}),
    ("DELETE", "/v1/files/file-abc", {}),
    ("GET", "/v1/batches", {}),
    ("POST", "/v1/batches", {"json": {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions",
                                      "completion_window": "24h"}}),
    ("GET", "/v1/batches/batch_abc", {}),
    ("POST", "/v1/batches/batch_abc/cancel", {}),
    ("GET", "/v1/openai/batches", {}),
    ("GET", "/batches", {}),
]
BAD = {
    "missing": {},
    "empty": {"Authorization": ""},
    "scheme only": {"Authorization": "Bearer"},
    "wrong key": {"Authorization": "Bearer ns-wrong-key"},
    "no scheme, wrong key": {"Authorization": "ns-wrong-key"},
    "other scheme": {"Authorization": f"Basic {KEY}"},
    "key twice": {"Authorization": f"Bearer {KEY} {KEY}"},
    "valid key, one char off": {"Authorization": f"Bearer {KEY[:-1]}"},
    "very long": {"Authorization": "Bearer " + "k" * 60_000},
    "non-ASCII": {"Authorization": "Bearer ключ-🔑".encode()},
    "non-ASCII x-api-key": {"x-api-key": "clé".encode("latin-1")},
    "empty x-api-key": {"x-api-key": ""},
}

checked = 0
for label, headers in BAD.items():
    for method, path, kw in ROUTES:
        resp = raw(method, path, key=False, headers=dict(headers), **kw)
        try:
            check_envelope(resp, 401, "authentication_error")
        except AssertionError as e:
            raise AssertionError(f"{label}: {method} {path}: {e}") from None
        checked += 1
# Nothing was stored by any of them.
c = client(KEY)
assert c.files.list().data == [], c.files.list()
assert c.batches.list().data == []

# The good key, in each accepted form, works (so the 401s above are about the key).
for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                {"x-api-key": KEY}):
    assert raw("GET", "/v1/files", key=False, headers=headers).status_code == 200, headers

# Oversized bodies: a JSON body over gateway.max_json_body_bytes is a 413, whatever it claims.
big = b'{"input_file_id": "' + b"x" * (MAX_JSON + 1) + b'"}'
err = check_envelope(raw("POST", "/v1/batches", data=big, headers={"Content-Type": "application/json"}), 413)
assert err["type"] == "invalid_request_error", err
# ... also when sent chunked, with no Content-Length to refuse up front.
def chunks():
    for i in range(0, len(big), 65536):
        yield big[i:i + 65536]
check_envelope(raw("POST", "/v1/batches", content=chunks(), headers={"Content-Type": "application/json"}), 413)
emit(checked=checked)
