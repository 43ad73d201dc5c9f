"""Upstream answers of 100 MB: each is cut at the upstream's max_response_bytes and becomes a
`response_too_large` error line; answers under the limit go through untouched."""

from nstest import emit
from pipeline import c, chat_line, check_exactly_once, upload_lines, wait

HUGE = 100_000_000
huge = [chat_line(f"huge-{i}", sim={"response_bytes": HUGE, "chunked": i % 2 == 1}) for i in range(24)]
fine = [chat_line(f"fine-{i}", sim={"response_bytes": 200_000}) for i in range(8)]
lines = huge + fine
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
done = wait(b.id, {"completed", "failed", "expired", "cancelled"}, deadline_s=240)
assert done.status == "completed", done
out, err = check_exactly_once(done, [l["custom_id"] for l in lines])
assert sorted(l["custom_id"] for l in out) == sorted(l["custom_id"] for l in fine), [l["custom_id"] for l in out]
for l in out:
    assert l["response"]["status_code"] == 200, l
for l in err:
    assert l["response"] is None, l
    assert l["error"]["code"] == "response_too_large", l["error"]
    assert "16 MiB" in l["error"]["message"] or "16777216" in l["error"]["message"], l["error"]
emit(too_large=len(err), ok=len(out))
