#!/usr/bin/env python3
"""The peer: what a user would write instead of a batch service.

An asyncio script with the official `openai` SDK (`AsyncOpenAI`): --concurrency workers take
the next of --lines chat requests and call the server directly, the SDK's own retries
included; answers are kept in memory only (no durability: a crash loses everything). Prints
one JSON object: the wall time from the first request to the last answer, and how many
requests succeeded or failed. `make bench` runs it against the inference simulator; run it
alone against any OpenAI-compatible server:

    python3 bench/peer_sdk.py --base-url http://127.0.0.1:8000/v1 --lines 20000 --concurrency 64
"""

import argparse
import asyncio
import json
import time

import openai


def request(i, model):
    """The i-th request of the run: the same body a batch line of `make bench` carries."""
    return {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16}


async def worker(client, queue, model, answers, failures):
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        try:
            answers[i] = await client.chat.completions.create(**request(i, model))
        except openai.OpenAIError as error:
            failures[i] = repr(error)


async def run(args):
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=args.max_retries)
    queue = asyncio.Queue()
    for i in range(args.lines):
        queue.put_nowait(i)
    answers, failures = {}, {}
    started = time.monotonic()
    await asyncio.gather(*(worker(client, queue, args.model, answers, failures) for _ in range(args.concurrency)))
    wall = time.monotonic() - started
    await client.close()
    return {"lines": args.lines, "concurrency": args.concurrency, "wall_secs": round(wall, 3),
            "succeeded": len(answers), "failed": len(failures)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True, help="the server's OpenAI root, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="peer")
    ap.add_argument("--model", default="sim-chat")
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64, help="workers, i.e. requests in flight at most")
    ap.add_argument("--max-retries", type=int, default=10, help="the SDK's retries of 429s and 5xx")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
