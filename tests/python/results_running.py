"""Results while running (`GET /v1/batches/{id}/results`, an extension): mid-run it streams a
non-empty strict subset of the batch's result lines, each byte-identical to its line in the
final files; once the batch has ended it streams exactly the output file then the error file;
`kind` filters; another tenant's batch is a 404, a bad `kind` a 400, both in the envelope."""

import json
import os
import time

from nstest import ORIGIN, check_envelope, emit, httpx, raw
from pipeline import c, chat_line, upload_lines, wait

ENDED = {"completed", "failed", "expired", "cancelled"}
TOTAL = 50
SLOW_FROM = 40  # lines 40.. (the last chunk of 10) take seconds; the others answer at once


def results(batch_id, kind=None, key=None):
    """One read: (lines, final header, status header, raw text)."""
    params = {} if kind is None else {"kind": kind}
    r = raw("GET", f"/v1/batches/{batch_id}/results", key=key, params=params)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/jsonl"), r.headers
    text = r.text
    assert text == "" or text.endswith("\n"), "a torn last line"
    lines = text.split("\n")[:-1]
    assert all(lines), "a blank line"
    assert len(set(lines)) == len(lines), "a line sent twice"
    return lines, r.headers["x-nightshift-results-final"], r.headers["x-nightshift-batch-status"], text


def outcome(line):
    """True for a success (an output-file line)."""
    l = json.loads(line)
    return l["response"] is not None and 200 <= l["response"]["status_code"] < 300


lines = []
for i in range(TOTAL):
    if i >= SLOW_FROM:
        lines.append(chat_line(f"slow-{i}", sim={"latency_ms": 5000}))
    elif i % 7 == 3:
        lines.append(chat_line(f"rejected-{i}", sim={"status": 400}))
    else:
        lines.append(chat_line(f"fast-{i}"))
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")

# Mid-run: poll until a read made while the batch is in progress shows some lines.
deadline = time.monotonic() + 60
mid = {}
while True:
    got, final, status, _ = results(b.id)
    if status == "in_progress" and got:
        assert final == "false", final
        assert len(got) < TOTAL, f"mid-run read shows all {len(got)} lines"
        mid["all"] = got
        # the filters, still mid-run (the slow chunk takes seconds more)
        mid["output"], _, _, _ = results(b.id, "output")
        mid["error"], _, _, _ = results(b.id, "error")
        break
    assert status not in ENDED, f"the batch ended ({status}) before a mid-run read saw a line"
    assert time.monotonic() < deadline, "no line within 60 s"
    time.sleep(0.1)
assert all(outcome(l) for l in mid["output"]), mid["output"]
assert not any(outcome(l) for l in mid["error"]), mid["error"]

done = wait(b.id, ENDED)
assert done.status == "completed", done
out_text = c.files.content(done.output_file_id).text
err_text = c.files.content(done.error_file_id).text
final_lines = set(out_text.split("\n")[:-1]) | set(err_text.split("\n")[:-1])
assert len(final_lines) == TOTAL, len(final_lines)

got, final, status, text = results(b.id)
assert (final, status) == ("true", "completed"), (final, status)
assert text == out_text + err_text, "after completion: not exactly output then error file"
assert results(b.id, "all")[3] == text
assert results(b.id, "output")[3] == out_text
assert results(b.id, "error")[3] == err_text

for kind, seen in mid.items():
    missing = [l for l in seen if l not in final_lines]
    assert not missing, f"{kind}: mid-run lines not in the final files as shown: {missing[:2]}"
assert set(mid["output"]) <= set(out_text.split("\n")), "a mid-run output line is not in the output file"
assert set(mid["error"]) <= set(err_text.split("\n")), "a mid-run error line is not in the error file"

# streamed line by line, as docs/api.md shows it (httpx: the SDK's own HTTP client)
with httpx.stream("GET", f"{ORIGIN}/v1/batches/{b.id}/results", params={"kind": "output"},
                  headers={"Authorization": f"Bearer {os.environ['NS_API_KEY']}"}, timeout=60) as r:
    assert r.status_code == 200 and r.headers["x-nightshift-results-final"] == "true", r
    streamed = [json.loads(l) for l in r.iter_lines() if l]
assert [json.dumps(l) for l in streamed] == [json.dumps(json.loads(l)) for l in out_text.split("\n")[:-1]]

# another tenant's batch does not exist for it; bad queries are 400s naming the parameter
r = raw("GET", f"/v1/batches/{b.id}/results", key=os.environ["NS_OTHER_KEY"])
check_envelope(r, 404, "invalid_request_error")
r = raw("GET", f"/v1/batches/{b.id}/results", params={"kind": "everything"})
check_envelope(r, 400, "invalid_request_error", param="kind")
r = raw("GET", f"/v1/batches/{b.id}/results", params={"after": "x"})
check_envelope(r, 400, "invalid_request_error", param="after")

emit(mid=len(mid["all"]), mid_output=len(mid["output"]), mid_error=len(mid["error"]), total=TOTAL)
