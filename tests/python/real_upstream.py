"""Against a real inference server (llama.cpp's llama-server, `make test-real`): a chat, a
completions and an embeddings batch run to `completed`; every custom_id once; the batch usage is
exactly the sum of the lines' real usage; a prompt longer than the server's context is the
server's own 400 on its own line while every other line of its batch succeeds."""

import collections

from nstest import emit
from pipeline import c, read_file, upload_lines, wait

ENDED = {"completed", "failed", "expired", "cancelled"}
MODEL = "gemma-3-270m"
# Far past the context of one slot (4096 tokens over 4 slots): the server refuses it with a 400.
OVERFLOW = "night " * 6000


def line(url, cid, body):
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


def run(url, lines, overflow_cid=None):
    b = c.batches.create(input_file_id=upload_lines(lines), endpoint=url, completion_window="24h")
    done = wait(b.id, ENDED, deadline_s=600)
    assert done.status == "completed", done
    out, err = read_file(done.output_file_id), read_file(done.error_file_id)
    seen = collections.Counter(l["custom_id"] for l in out + err)
    assert all(n == 1 for n in seen.values()) and set(seen) == {l["custom_id"] for l in lines}, seen
    expected_err = {overflow_cid} if overflow_cid else set()
    assert {l["custom_id"] for l in err} == expected_err, err
    for l in err:
        r = l["response"]
        assert l["error"] is None and r is not None and r["status_code"] == 400, l
        assert "error" in r["body"], r
    for l in out:
        assert l["response"]["status_code"] == 200, l
    prompt = sum(l["response"]["body"]["usage"]["prompt_tokens"] for l in out)
    completion = sum(l["response"]["body"]["usage"].get("completion_tokens", 0) for l in out)
    u = done.usage
    assert prompt > 0, out[:1]
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (prompt, completion, prompt + completion), (u, prompt, completion)
    rc = done.request_counts
    assert (rc.total, rc.completed, rc.failed) == (len(lines), len(out), len(err)), rc
    return out, u


chat = [line("/v1/chat/completions", f"chat-{i}", {
    "messages": [{"role": "user", "content": f"Count to {i + 2}."}], "max_tokens": 12, "temperature": 0,
}) for i in range(6)]
chat.append(line("/v1/chat/completions", "chat-overflow", {
    "messages": [{"role": "user", "content": OVERFLOW}], "max_tokens": 4,
}))
chat_out, chat_usage = run("/v1/chat/completions", chat, "chat-overflow")
assert all(l["response"]["body"]["object"] == "chat.completion" for l in chat_out)
assert chat_usage.output_tokens > 0, chat_usage

completions = [line("/v1/completions", f"cmpl-{i}", {
    "prompt": f"The number {i} is", "max_tokens": 8, "temperature": 0,
}) for i in range(6)]
completions.append(line("/v1/completions", "cmpl-overflow", {"prompt": OVERFLOW, "max_tokens": 4}))
cmpl_out, cmpl_usage = run("/v1/completions", completions, "cmpl-overflow")
assert cmpl_usage.output_tokens > 0, cmpl_usage

embeddings = [line("/v1/embeddings", f"emb-{i}", {"input": f"a short text number {i}"}) for i in range(6)]
emb_out, emb_usage = run("/v1/embeddings", embeddings)
assert emb_usage.output_tokens == 0, emb_usage
dims = {len(l["response"]["body"]["data"][0]["embedding"]) for l in emb_out}
assert len(dims) == 1 and dims.pop() > 0, dims

emit(ok=True, chat=chat_usage.total_tokens, completions=cmpl_usage.total_tokens, embeddings=emb_usage.total_tokens)
