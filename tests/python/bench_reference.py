"""The reference Python worker (byclaw-gateway-sdk) serving `echo` for
`gatewayd-bench --reference`: the same work as our echo plugin — the input
streamed back in three chunks, then {"echo": text, "chunks": 3} — so the
benchmark measures both workers on one Redis, in one run.

  python bench_reference.py --redis-url URL --worker-id ID \
      [--max-concurrency 256] [--fetch-count 64]

Runs until killed. The SDK keeps history in memory by default; that is
what runs here (its Redis/PostgreSQL stores are opt-in).
"""

import argparse
import asyncio
import json
import logging
import tempfile
from urllib.parse import urlparse

from byclaw_gateway_sdk import GatewayWorker
from byclaw_gateway_sdk.worker.app import _run_worker_async


class ReferenceEcho(GatewayWorker):
    """Echo, as the reference benchmark worker does it."""

    def get_capabilities(self):
        return ["echo"]

    async def process_command(self, command, context):
        text = command.content if isinstance(command.content, str) else json.dumps(command.content)
        for part in range(3):
            await context.emit_chunk(text[len(text) * part // 3:len(text) * (part + 1) // 3])
        return {"echo": text, "chunks": 3}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument("--fetch-count", type=int, default=64)
    args = parser.parse_args()
    # The SDK logs every task at INFO; a log line per event would measure
    # the logger, not the worker.
    logging.disable(logging.INFO)
    url = urlparse(args.redis_url)
    workspace = tempfile.TemporaryDirectory(prefix="byclaw-bench-reference-")
    await _run_worker_async(
        ReferenceEcho, args.worker_id, url.hostname, url.port or 6379,
        int((url.path or "/0")[1:] or 0), None, None, workspace.name,
        "agent_engines", max_concurrency=args.max_concurrency, fetch_count=args.fetch_count)


if __name__ == "__main__":
    asyncio.run(main())
