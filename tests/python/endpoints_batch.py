"""A batch of `/v1/responses`, `/v1/moderations` or `/v1/completions` requests (NS_ENDPOINT)
runs to `completed` against the simulator: every custom_id once, every body a valid object of
the SDK's own type, an upstream 400 on its own line, and the batch `usage` the sum of the
lines' usage (zero for moderations, which report none)."""

import collections
import os

from openai.types import Completion, ModerationCreateResponse
from openai.types.responses import Response

from nstest import emit
from pipeline import c, read_file, upload_lines, wait

ENDPOINT = os.environ["NS_ENDPOINT"]
ENDED = {"completed", "failed", "expired", "cancelled"}


def line(cid, body):
    return {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}


def run(lines):
    """Runs a batch of `lines` to its end; returns it with its output and error lines by
    custom_id, after checking every custom_id appears exactly once across the two files."""
    b = c.batches.create(input_file_id=upload_lines(lines), endpoint=ENDPOINT, completion_window="24h")
    done = wait(b.id, ENDED)
    assert done.status == "completed", done
    assert done.endpoint == ENDPOINT, done
    out, err = read_file(done.output_file_id), read_file(done.error_file_id)
    seen = collections.Counter(l["custom_id"] for l in out + err)
    assert all(n == 1 for n in seen.values()), seen
    assert set(seen) == {l["custom_id"] for l in lines}, seen
    rc = done.request_counts
    assert (rc.total, rc.completed, rc.failed) == (len(lines), len(out), len(err)), rc
    for l in out:
        assert l["error"] is None and l["response"]["status_code"] == 200, l
    return done, {l["custom_id"]: l for l in out}, {l["custom_id"]: l for l in err}


def check_upstream_400(err, cid):
    r = err[cid]["response"]
    assert err[cid]["error"] is None and r["status_code"] == 400, err[cid]
    assert r["body"]["error"]["type"] == "invalid_request_error", r


def responses():
    text_lines = [line(f"text-{i}", {"model": "sim-chat", "input": f"say text {i} please"}) for i in range(6)]
    item_lines = [
        line("items-messages", {"model": "sim-chat", "input": [
            {"role": "developer", "content": "answer in one line"},
            {"role": "user", "content": "what is a night shift"},
        ]}),
        line("items-parts", {"model": "sim-chat", "instructions": "be brief", "input": [
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "describe this"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ]},
        ]}),
        line("items-tool", {"model": "sim-chat", "tools": [
            {"type": "function", "name": "clock", "parameters": {"type": "object", "properties": {}}},
        ], "input": [
            {"role": "user", "content": "what time is it"},
            {"type": "function_call", "call_id": "call_1", "name": "clock", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "three in the morning"},
        ]}),
        line("items-capped", {"model": "sim-chat", "max_output_tokens": 16, "input": [
            {"role": "user", "content": "a long story please"},
        ]}),
        line("items-more", {"model": "sim-chat", "temperature": 0.3, "input": [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ]}),
    ]
    rejected = line("rejected", {"model": "sim-chat", "input": "no", "sim": {"status": 400}})
    lines = text_lines + item_lines + [rejected]
    done, out, err = run(lines)
    assert done.model == "sim-chat", done
    assert set(err) == {"rejected"}, err.keys()
    check_upstream_400(err, "rejected")

    want = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0}
    for cid, l in out.items():
        body = l["response"]["body"]
        r = Response.model_validate(body)  # the SDK's own type, every required field present
        assert r.object == "response" and r.id.startswith("resp_") and r.model == "sim-chat", r
        assert r.output_text.startswith("sim:"), r.output_text
        u = r.usage
        assert u.total_tokens == u.input_tokens + u.output_tokens, u
        assert "prompt_tokens" not in body["usage"], body["usage"]
        want["input_tokens"] += u.input_tokens
        want["output_tokens"] += u.output_tokens
        want["total_tokens"] += u.total_tokens
        want["cached_tokens"] += u.input_tokens_details.cached_tokens
        want["reasoning_tokens"] += u.output_tokens_details.reasoning_tokens
    # Tokens are words: the simulator's documented count.
    for i in range(6):
        assert out[f"text-{i}"]["response"]["body"]["usage"]["input_tokens"] == 4
    assert out["items-messages"]["response"]["body"]["usage"]["input_tokens"] == 4 + 5
    assert out["items-parts"]["response"]["body"]["usage"]["input_tokens"] == 2 + 2 + 85
    assert out["items-parts"]["response"]["body"]["instructions"] == "be brief"
    assert out["items-tool"]["response"]["body"]["tools"][0]["name"] == "clock"
    capped = out["items-capped"]["response"]["body"]
    assert capped["max_output_tokens"] == 16 and capped["usage"]["output_tokens"] <= 16, capped
    assert capped["status"] in {"completed", "incomplete"}, capped

    u = done.usage
    got = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "total_tokens": u.total_tokens,
           "cached_tokens": u.input_tokens_details.cached_tokens,
           "reasoning_tokens": u.output_tokens_details.reasoning_tokens}
    assert got == want, (got, want)
    assert u.input_tokens > 0 and u.output_tokens > 0, u
    return {"lines": len(lines), "usage": got}


def moderations():
    model = "omni-moderation-latest"
    calm = [line(f"calm-{i}", {"model": model, "input": f"a calm night number {i}"}) for i in range(5)]
    lines = calm + [
        line("flagged", {"model": model, "input": "I will kill the batch"}),
        line("several", {"model": model, "input": ["a calm sea", "we hate mondays", "quiet"]}),
        line("omni", {"model": model, "input": [
            {"type": "text", "text": "look at this"},
            {"type": "image_url", "image_url": {"url": "https://example.com/night.png"}},
        ]}),
        line("rejected", {"model": model, "input": "no", "sim": {"status": 400}}),
    ]
    done, out, err = run(lines)
    assert done.model == model, done
    assert set(err) == {"rejected"}, err.keys()
    check_upstream_400(err, "rejected")

    flags = {}
    for cid, l in out.items():
        body = l["response"]["body"]
        m = ModerationCreateResponse.model_validate(body)  # the SDK's own type
        assert m.id.startswith("modr-") and m.model == model, m
        assert "usage" not in body, body
        flags[cid] = [r.flagged for r in m.results]
    assert flags == {**{f"calm-{i}": [False] for i in range(5)}, "flagged": [True],
                     "several": [False, True, False], "omni": [False]}, flags
    flagged = out["flagged"]["response"]["body"]["results"][0]
    assert flagged["categories"]["violence"] is True and flagged["category_scores"]["violence"] >= 0.9, flagged
    assert out["several"]["response"]["body"]["results"][1]["categories"]["hate"] is True
    omni = out["omni"]["response"]["body"]["results"][0]["category_applied_input_types"]
    assert omni["violence"] == ["text", "image"] and omni["hate"] == ["text"], omni

    # No line reports usage, so the batch's stays zero while its lines completed.
    u = done.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (0, 0, 0), u
    assert (u.input_tokens_details.cached_tokens, u.output_tokens_details.reasoning_tokens) == (0, 0), u
    assert done.request_counts.completed == len(lines) - 1, done.request_counts
    return {"lines": len(lines), "usage": u.model_dump()}


def completions():
    lines = [line(f"text-{i}", {"model": "sim-chat", "prompt": f"once upon {i}", "max_tokens": 12}) for i in range(6)]
    lines += [
        line("token-ids", {"model": "sim-chat", "prompt": [1, 2, 3, 4, 5]}),
        line("two-prompts", {"model": "sim-chat", "prompt": ["first one", "second"], "n": 2}),
        line("rejected", {"model": "sim-chat", "prompt": "no", "sim": {"status": 400}}),
    ]
    done, out, err = run(lines)
    assert set(err) == {"rejected"}, err.keys()
    check_upstream_400(err, "rejected")
    inp = outp = 0
    for cid, l in out.items():
        m = Completion.model_validate(l["response"]["body"])  # the SDK's own type
        assert m.object == "text_completion" and all(ch.text.startswith("sim:") for ch in m.choices), m
        assert m.usage.total_tokens == m.usage.prompt_tokens + m.usage.completion_tokens, m.usage
        inp += m.usage.prompt_tokens
        outp += m.usage.completion_tokens
    body = lambda cid: out[cid]["response"]["body"]
    assert body("token-ids")["usage"]["prompt_tokens"] == 5
    assert len(body("two-prompts")["choices"]) == 4 and body("two-prompts")["usage"]["prompt_tokens"] == 3
    assert all(body(f"text-{i}")["usage"]["completion_tokens"] <= 12 for i in range(6))
    u = done.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (inp, outp, inp + outp), (u, inp, outp)
    return {"lines": len(lines), "usage": u.model_dump()}


ENDPOINTS = {"/v1/responses": responses, "/v1/moderations": moderations, "/v1/completions": completions}
emit(ok=True, endpoint=ENDPOINT, **ENDPOINTS[ENDPOINT]())
