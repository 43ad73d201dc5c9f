"""A batch that cannot finish within its (short, test-only) completion window ends `expired`:
finished results kept, the rest `batch_expired`, every custom_id exactly once."""

from nstest import emit
from pipeline import c, chat_line, check_exactly_once, upload_lines, wait

lines = [chat_line(f"late-{i}", sim={"latency_ms": 300}) for i in range(200)]
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="4s")
assert b.expires_at == b.created_at + 4
done = wait(b.id, {"expired", "completed", "failed", "cancelled"}, deadline_s=90)
assert done.status == "expired" and done.expired_at, done
out, err = check_exactly_once(done, [l["custom_id"] for l in lines])
codes = {l["error"]["code"] for l in err if l["response"] is None}
assert codes <= {"batch_expired"} and err, codes
emit(kept=len(out), expired=len(err))
