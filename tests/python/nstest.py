"""Helpers shared by the end-to-end scripts: clients pointed at the stack under test, and
checks of OpenAI's error envelope. Every script exits non-zero on the first failed check."""

import json
import os

try:  # the SDK ships its HTTP client as httpx2 in 3.x, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai
from openai import OpenAI

ORIGIN = os.environ["NS_ORIGIN"]
BASE_URL = os.environ["NS_BASE_URL"]


def client(key=None, base_url=BASE_URL):
    """The official SDK, strict: any field missing or mistyped in a response raises."""
    return OpenAI(
        base_url=base_url,
        api_key=key or os.environ["NS_API_KEY"],
        _strict_response_validation=True,
        max_retries=0,
    )


def raw(method, path, key=None, **kwargs):
    """A raw HTTP call (for what the SDK cannot send: bad forms, wrong methods, ...)."""
    headers = kwargs.pop("headers", {})
    if key is not False:
        headers.setdefault("Authorization", f"Bearer {key or os.environ['NS_API_KEY']}")
    return httpx.request(method, ORIGIN + path, headers=headers, timeout=60, **kwargs)


def check_envelope(resp, status, type_=None, param="<any>", code="<any>", contains=None):
    """Asserts an OpenAI-shaped error response and returns its error object."""
    body_text = resp.text
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {body_text}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"content-type {ctype!r}: {body_text}"
    assert resp.headers.get("x-request-id"), "no x-request-id header"
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if type_ is not None:
        assert err["type"] == type_, err
    if param != "<any>":
        assert err["param"] == param, err
    if code != "<any>":
        assert err["code"] == code, err
    if contains is not None:
        assert contains.lower() in err["message"].lower(), err
    return err


def expect_sdk_error(exc_type, fn, status, param="<any>", code="<any>"):
    """Calls `fn`, which must raise the SDK's `exc_type` with that status and error fields."""
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, (e.status_code, e.body)
        body = e.body if isinstance(e.body, dict) else {}
        if param != "<any>":
            assert body.get("param") == param, body
        if code != "<any>":
            assert body.get("code") == code, body
        return e
    raise AssertionError(f"expected {exc_type.__name__} ({status})")


def emit(**values):
    """Reports values back to the Rust side of the test (last line of stdout)."""
    print(json.dumps(values), flush=True)


__all__ = ["client", "raw", "check_envelope", "expect_sdk_error", "emit", "openai", "json"]
