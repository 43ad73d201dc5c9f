"""Verifies every delivery a test's receiver recorded with the official SDK's
`client.webhooks.unwrap(payload, headers, secret=…)` (the signature over id, timestamp and the
exact body bytes, and the 5-minute timestamp window), then checks each event's type and
`data.id` against NS_EXPECT ({batch id: event type}). A tampered body or another secret must
fail verification."""

import json
import os

from openai import InvalidWebhookSignatureError

from nstest import client, emit

c = client()
secret = os.environ["NS_SECRET"]
expect = json.loads(os.environ["NS_EXPECT"])
with open(os.environ["NS_DELIVERIES"]) as f:
    deliveries = json.load(f)

seen = {}
for d in deliveries:
    headers, body = d["headers"], d["body"]
    event = c.webhooks.unwrap(body, headers, secret=secret)
    assert event.object == "event", event
    assert event.id.startswith("evt_") and event.id == headers["webhook-id"], (event.id, headers)
    assert event.data.id in expect, event
    assert event.type == expect[event.data.id], (event.type, expect[event.data.id])
    assert isinstance(event.created_at, int), event
    # the body is OpenAI's, key for key
    assert list(json.loads(body)) == ["id", "object", "type", "created_at", "data"], body
    seen.setdefault(event.data.id, set()).add(event.id)
    for bad_body, bad_secret in [(body + " ", secret), (body, "whsec_" + "QUJD" * 8)]:
        try:
            c.webhooks.unwrap(bad_body, headers, secret=bad_secret)
        except InvalidWebhookSignatureError:
            pass
        else:
            raise AssertionError("a tampered delivery verified")

assert set(seen) == set(expect), (set(expect) - set(seen))
# one event per batch: every delivery of a batch (retries too) carries the same id
assert all(len(ids) == 1 for ids in seen.values()), seen
emit(verified=len(deliveries), batches=len(seen))
