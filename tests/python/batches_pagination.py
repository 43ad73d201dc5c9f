"""GET /v1/batches across many batches: each visited exactly once, newest first, with exact
has_more, through raw cursors and the SDK's auto-pagination."""

import os

from nstest import client, emit, raw

c = client()
N = int(os.environ["NS_BATCHES"])
ids = [c.batches.create(input_file_id="file-unknown", endpoint="/v1/embeddings", completion_window="24h").id
       for _ in range(N)]
newest_first = list(reversed(ids))

for limit in (1, 20, 100):
    seen, after = [], None
    while True:
        q = f"/v1/batches?limit={limit}" + (f"&after={after}" if after else "")
        page = raw("GET", q).json()
        assert set(page) == {"object", "data", "first_id", "last_id", "has_more"}, page.keys()
        assert len(page["data"]) <= limit
        assert page["data"] or not page["has_more"], "empty page with has_more"
        if page["data"]:
            assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == newest_first, f"limit {limit}: {len(seen)} seen"

# default page size 20; the SDK walks every page
first = c.batches.list()
assert len(first.data) == min(20, N) and first.has_more == (N > 20)
assert [b.id for b in c.batches.list(limit=50)] == newest_first
# an unknown cursor: an empty, final page
empty = raw("GET", "/v1/batches?after=batch_unknown").json()
assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}, empty
emit(count=len(ids))
