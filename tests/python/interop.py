"""Drives gatewayd with the reference Python SDK (byclaw-gateway-sdk).

  python interop.py --redis-url URL send --agent-type echo --text TEXT
      ByaiGatewayClient.send_message → events read back with redis-py until
      a terminal state; prints one JSON object.
  python interop.py --redis-url URL cancel --agent-type slow --text 20000
      send_message, wait for the first event, then ByaiGatewayClient.cancel_task
      (which finds our worker through the session registry); prints the cancel
      response and the events.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid
from urllib.parse import urlparse

from byclaw_gateway_sdk import ByaiGatewayClient, RedisKeys, WorkerRegistry
from redis.asyncio import Redis

TERMINAL = ("COMPLETED", "CANCELLED")


def is_terminal(event):
    if event["data"]["contentType"] != "3003":
        return False
    state = event["data"]["choices"][0]["delta"]["content"] or ""
    return state in TERMINAL or state.startswith("FAILED") or state.startswith("QUEUED: ")


async def read_events(redis, session_id, timeout, stop=is_terminal):
    stream = RedisKeys.session_data_stream(session_id)
    last, events, deadline = "0", [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await redis.xread({stream: last}, block=200, count=100)
        for _name, entries in reply:
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields["data"])
                events.append(event)
                if stop(event):
                    return events
    raise TimeoutError(f"no terminal event on {stream} within {timeout}s: {events}")


def summary(session_id, message_id, events):
    chunks = "".join(
        e["data"]["choices"][0]["delta"]["content"] or ""
        for e in events
        if e["event_type"] == "answerDelta"
    )
    return {
        "session_id": session_id,
        "message_id": message_id,
        "events": events,
        "chunks": chunks,
        "terminal": events[-1]["data"]["choices"][0]["delta"]["content"],
    }


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("mode", choices=["send", "cancel"])
    parser.add_argument("--agent-type", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()

    url = urlparse(args.redis_url)
    redis = Redis(host=url.hostname, port=url.port or 6379, db=int((url.path or "/0")[1:] or 0),
                  decode_responses=True)
    client = ByaiGatewayClient(registry=WorkerRegistry(redis), redis_client=redis)
    session_id = f"py-{uuid.uuid4().hex[:12]}"
    sent = await client.send_message(args.agent_type, session_id, args.text)
    if not sent.success:
        print(f"send_message failed: no worker serves {args.agent_type}", file=sys.stderr)
        sys.exit(1)
    out = {"target_worker_id": sent.target_worker_id}
    if args.mode == "cancel":
        await read_events(redis, session_id, args.timeout, stop=lambda e: True)
        # The execution record names the worker; cancel_task routes by it.
        deadline = time.monotonic() + args.timeout
        while True:
            response = await client.cancel_task(sent.message_id, session_id, reason="python says stop")
            if response.status != "NOT_FOUND" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        out["cancel"] = {"success": response.success, "status": str(response.status),
                         "worker_id": response.worker_id}
    events = await read_events(redis, session_id, args.timeout)
    out.update(summary(session_id, sent.message_id, events))
    print(json.dumps(out))
    await redis.delete(RedisKeys.session_data_stream(session_id), f"byai_gateway:session:{session_id}:registry")
    await redis.aclose()


asyncio.run(main())
