"""Webhooks, the tenant's side: registers an endpoint with the official SDK's own webhook API
(`client.webhooks.create/retrieve/list/rotate_secret`, strict validation) when NS_RECEIVER is
set, then ends one batch per kind in NS_KINDS (completed, failed, cancelled, expired) and emits
the endpoint, its signing secret and the batch ids by kind."""

import os

from nstest import emit
from pipeline import c, chat_line, upload_lines, wait

TERMINAL = {"completed", "failed", "cancelled", "expired"}
kinds = os.environ.get("NS_KINDS", "completed,failed,cancelled,expired").split(",")
receiver = os.environ.get("NS_RECEIVER", "")

endpoint, secret = None, None
if receiver:
    created = c.webhooks.create(
        url=receiver,
        name="e2e receiver",
        event_types=["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"],
    )
    assert created.id.startswith("we_") and created.object == "webhook_endpoint", created
    assert created.signing_secret.startswith("whsec_"), created
    assert created.url == receiver and created.name == "e2e receiver", created
    assert created.signing_secret_hint.endswith(created.signing_secret[-4:]), created
    # the secret is shown once: never by a read
    got = c.webhooks.retrieve(created.id)
    assert got.id == created.id and "signing_secret" not in got.model_dump(), got
    assert sorted(got.event_types) == sorted(created.event_types), got
    assert created.id in [e.id for e in c.webhooks.list()], "listed"
    # a rotation returns a new secret, which signs every delivery from now on
    rotated = c.webhooks.rotate_secret(created.id)
    assert rotated.signing_secret.startswith("whsec_") and rotated.signing_secret != created.signing_secret
    endpoint, secret = created.id, rotated.signing_secret

batches = {}
for kind in kinds:
    if kind == "completed":
        lines = [chat_line(f"ok-{i}") for i in range(3)]
        b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
    elif kind == "failed":
        # a model no upstream serves: validation fails the batch
        lines = [chat_line("bad-0", model="no-such-model")]
        b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
    elif kind == "cancelled":
        lines = [chat_line(f"slow-{i}", sim={"latency_ms": 200}) for i in range(100)]
        b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="24h")
        c.batches.cancel(b.id)
    elif kind == "expired":
        # 300 requests of 3 s cannot all finish in the 4 s window, whatever the concurrency
        lines = [chat_line(f"late-{i}", sim={"latency_ms": 3000}) for i in range(300)]
        b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/chat/completions", completion_window="4s")
    else:
        raise AssertionError(f"unknown kind {kind}")
    batches[kind] = b.id

for kind, bid in batches.items():
    done = wait(bid, TERMINAL, deadline_s=120)
    assert done.status == kind, (kind, done.status)

emit(endpoint=endpoint, secret=secret, batches=batches)
