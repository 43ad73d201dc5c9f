"""Cancel mid-run: the batch reaches `cancelled`, finished results are kept, the rest are
`batch_cancelled` lines, every custom_id exactly once."""

import time

from nstest import emit
from pipeline import c, chat_line, check_exactly_once, upload_lines, wait

lines = [chat_line(f"slow-{i}", sim={"latency_ms": 150}) for i in range(300)]
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
# wait until some requests have finished (the live counts show it), then cancel
progress = wait(b.id, {"completed", "failed"} | {"in_progress"})
deadline = time.monotonic() + 60
while progress.request_counts.completed < 5:
    assert time.monotonic() < deadline, progress
    assert progress.status == "in_progress", progress
    time.sleep(0.05)
    progress = c.batches.retrieve(b.id)
cancelling = c.batches.cancel(b.id)
assert cancelling.status in ("cancelling", "cancelled"), cancelling
done = wait(b.id, {"cancelled", "completed", "failed", "expired"})
assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at, done
out, err = check_exactly_once(done, [l["custom_id"] for l in lines])
assert len(out) >= 5, len(out)
codes = {l["error"]["code"] for l in err if l["response"] is None}
assert codes == {"batch_cancelled"}, codes
assert len(err) > 0, "cancel came too late to cancel anything"
# cancelling again returns the cancelled batch
assert c.batches.cancel(b.id).status == "cancelled"
emit(kept=len(out), cancelled=len(err))
