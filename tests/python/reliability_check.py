"""Reliability tests, phase 2: batch NS_BATCH ended NS_STATUS with every custom_id r-0 ..
r-{NS_LINES - 1} exactly once and exact counts. Without NS_CODE every line completed; with
it, every line that did not run is an error line with that code."""

import os

from nstest import emit
from pipeline import check_exactly_once, wait

n = int(os.environ["NS_LINES"])
done = wait(os.environ["NS_BATCH"], {"completed", "failed", "expired", "cancelled"}, deadline_s=240)
assert done.status == os.environ["NS_STATUS"], done
out, err = check_exactly_once(done, [f"r-{i}" for i in range(n)])
code = os.environ.get("NS_CODE")
if code:
    codes = {l["error"]["code"] for l in err if l["response"] is None}
    assert codes <= {code}, codes
    assert all(l["response"] is None for l in err), [l for l in err if l["response"] is not None][:3]
else:
    assert len(out) == n and not err, (len(out), len(err))
emit(completed=len(out), failed=len(err))
