"""Reliability tests, phase 1: upload NS_LINES chat requests (custom ids r-0, r-1, ...), each
answered by the simulator after NS_LATENCY_MS, and create their batch. With NS_DELETE_INPUT
set, the owner deletes the input file right after creating the batch (upload, create,
delete: a common client pattern), and the file is gone from the API at once."""

import os

from nstest import emit, expect_sdk_error, openai
from pipeline import c, chat_line, upload_lines

n = int(os.environ["NS_LINES"])
latency = int(os.environ.get("NS_LATENCY_MS", "0"))
lines = [chat_line(f"r-{i}", sim={"latency_ms": latency}) for i in range(n)]
input_id = upload_lines(lines)
b = c.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
if os.environ.get("NS_DELETE_INPUT"):
    deleted = c.files.delete(input_id)
    assert deleted.deleted and deleted.id == input_id, deleted
    # hidden at once: 404 and not listed, while the batch goes on reading it
    expect_sdk_error(openai.NotFoundError, lambda: c.files.retrieve(input_id), 404)
    expect_sdk_error(openai.NotFoundError, lambda: c.files.content(input_id), 404)
    assert input_id not in [f.id for f in c.files.list(limit=10000)], "a deleted file is listed"
emit(batch=b.id, input=input_id)
