"""Operator-declared endpoints (`[[routing.upstreams]] endpoints`): a `/v1/rerank` and a
`/v1/score` batch run to `completed` against the simulator's vLLM-shaped endpoints — every
custom_id once, each body passed through verbatim (the answer ranks exactly the documents
sent), an upstream 400 on its own line, the batch `usage` the sum of the lines'. An endpoint
no upstream declares is a 400 naming `endpoint`; a declared endpoint on a model whose upstream
does not declare it fails validation with `endpoint_not_served`."""

import collections
import json

from nstest import emit, expect_sdk_error, openai
from pipeline import c, read_file, upload_lines, wait

ENDED = {"completed", "failed", "expired", "cancelled"}
MODEL = "sim-rerank"


def line(url, cid, body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def run(url, lines):
    b = c.batches.create(input_file_id=upload_lines(lines), endpoint=url, completion_window="24h")
    assert b.endpoint == url, b
    done = wait(b.id, ENDED)
    assert done.status == "completed", done
    out, err = read_file(done.output_file_id), read_file(done.error_file_id)
    seen = collections.Counter(l["custom_id"] for l in out + err)
    assert all(n == 1 for n in seen.values()) and set(seen) == {l["custom_id"] for l in lines}, seen
    rc = done.request_counts
    assert (rc.total, rc.completed, rc.failed) == (len(lines), len(out), len(err)), rc
    prompt = sum(l["response"]["body"]["usage"]["prompt_tokens"] for l in out)
    u = done.usage
    assert prompt > 0 and (u.input_tokens, u.output_tokens, u.total_tokens) == (prompt, 0, prompt), (u, prompt)
    return {l["custom_id"]: l for l in out}, {l["custom_id"]: l for l in err}


def rejected_400(err, cid):
    r = err[cid]["response"]
    assert err[cid]["error"] is None and r["status_code"] == 400, err[cid]
    assert r["body"]["error"]["type"] == "invalid_request_error", r


# /v1/rerank: each answer ranks exactly the documents its line sent
docs = {f"q{i}": [f"doc {i} {j} " + "word " * j for j in range(1 + i % 4)] for i in range(8)}
rerank_lines = [line("/v1/rerank", cid, {"model": MODEL, "query": f"query {cid}", "documents": d})
                for cid, d in docs.items()]
rerank_lines.append(line("/v1/rerank", "top-2", {"model": MODEL, "query": "q", "documents": ["a", "b c", "d"], "top_n": 2}))
rerank_lines.append(line("/v1/rerank", "rejected", {"model": MODEL, "query": "q", "documents": ["a"], "sim": {"status": 400}}))
out, err = run("/v1/rerank", rerank_lines)
assert set(err) == {"rejected"}, err.keys()
rejected_400(err, "rejected")
for cid, d in docs.items():
    body = out[cid]["response"]["body"]
    assert body["model"] == MODEL and body["id"].startswith("rerank-"), body
    ranked = body["results"]
    assert sorted(r["index"] for r in ranked) == list(range(len(d))), ranked
    assert all(r["document"]["text"] == d[r["index"]] for r in ranked), ranked
    scores = [r["relevance_score"] for r in ranked]
    assert scores == sorted(scores, reverse=True), scores
assert len(out["top-2"]["response"]["body"]["results"]) == 2

# /v1/score: one text against many, and pairs in order
score_lines = [line("/v1/score", f"s{i}", {"model": MODEL, "text_1": f"left {i}", "text_2": [f"right {i}", "other"]})
               for i in range(5)]
score_lines.append(line("/v1/score", "pairs", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["c", "d"]}))
score_lines.append(line("/v1/score", "mismatched", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}))
out, err = run("/v1/score", score_lines)
assert set(err) == {"mismatched"}, err.keys()
rejected_400(err, "mismatched")
for cid, l in out.items():
    body = l["response"]["body"]
    assert body["object"] == "list" and len(body["data"]) == 2, body
    assert all(d["object"] == "score" and 0 <= d["score"] < 1 for d in body["data"]), body

# an endpoint no upstream declares: a 400 naming it, as for any unsupported endpoint
f = upload_lines([line("/v1/classify", "x", {"model": MODEL, "input": "x"})])
expect_sdk_error(openai.BadRequestError,
                 lambda: c.batches.create(input_file_id=f, endpoint="/v1/classify", completion_window="24h"),
                 400, param="endpoint", code="invalid_value")
# a declared endpoint, but the model's upstream does not declare it
f = upload_lines([line("/v1/rerank", "x", {"model": "sim-chat", "query": "q", "documents": ["a"]})])
b = c.batches.create(input_file_id=f, endpoint="/v1/rerank", completion_window="24h")
done = wait(b.id, ENDED)
assert done.status == "failed", done
codes = [(e.code, e.line, e.param) for e in done.errors.data]
assert codes == [("endpoint_not_served", 1, "body.model")], codes

emit(ok=True, rerank=len(rerank_lines), score=len(score_lines))
