"""Phase 1 of a crash test: upload an N-line embeddings batch and create it."""

import os

from nstest import emit
from pipeline import c, upload_lines

n = int(os.environ["NS_LINES"])
lines = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/embeddings",
          "body": {"model": "sim-embed", "input": f"document number {i}"}} for i in range(n)]
b = c.batches.create(input_file_id=upload_lines(lines), endpoint="/v1/embeddings", completion_window="24h")
emit(batch=b.id)
