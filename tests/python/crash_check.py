"""Phase 2 of a crash test: the batch completes anyway, every custom_id exactly once, counts
exact."""

import os

from nstest import emit
from pipeline import check_exactly_once, wait

n = int(os.environ["NS_LINES"])
done = wait(os.environ["NS_BATCH"], {"completed", "failed", "expired", "cancelled"}, deadline_s=240)
assert done.status == "completed", done
out, err = check_exactly_once(done, [f"r-{i}" for i in range(n)])
assert len(out) == n and not err, (len(out), len(err))
emit(completed=len(out))
