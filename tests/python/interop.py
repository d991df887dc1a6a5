"""Drives gatewayd with the reference Python SDK (byclaw-gateway-sdk).

  python interop.py --redis-url URL send --agent-type echo --text TEXT
      ByaiGatewayClient.send_message → events read back with redis-py until
      a terminal state; prints one JSON object.
  python interop.py --redis-url URL cancel --agent-type slow --text 20000
      send_message, wait for the first event, then ByaiGatewayClient.cancel_task
      (which finds our worker through the session registry); prints the cancel
      response and the events.
  python interop.py --redis-url URL call-agent --agent-type echo --text TEXT
      runs a reference Python worker whose agent calls our agent with
      context.call_agent; our reply comes back to it as a RESUME, which it
      streams as a chunk. Prints the events and the reply_data it received.
  python interop.py --redis-url URL serve-translator --agent-type translator --text WORKER_ID
      runs a reference Python worker serving the agent type until killed; it
      answers with {"translation": <content upper-cased>, "language": "py"}.
  python interop.py --redis-url URL resume --agent-type planner --text ANSWER \
          --session SESSION --parent MESSAGE_ID
      answers a task waiting in ask-user with the reference client's
      send_message(action_type="RESUME", parent_message_id=...).

With `--sentinel NAME@HOST:PORT,HOST:PORT` instead of a usable --redis-url,
the client talks to the master those sentinels name (redis-py's Sentinel
handing the SDK its client: the SDK itself only takes host and port).

The result is the one stdout line starting with `{` (the SDK logs to stdout too).
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from urllib.parse import urlparse

from byclaw_gateway_sdk import (ByaiGatewayClient, GatewayWorker, RedisKeys, ResumeCommand,
                                WorkerRegistry)
from byclaw_gateway_sdk.worker.app import _run_worker_async
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
    parser.add_argument("mode", choices=["send", "cancel", "call-agent", "serve-translator", "resume"])
    parser.add_argument("--session")
    parser.add_argument("--parent")
    parser.add_argument("--agent-type", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--tenant", default="")
    parser.add_argument("--sentinel", default="")
    args = parser.parse_args()

    url = urlparse(args.redis_url)
    if args.sentinel:
        from redis.asyncio.sentinel import Sentinel
        name, nodes = args.sentinel.split("@", 1)
        addresses = [(host, int(port)) for host, port in
                     (node.rsplit(":", 1) for node in nodes.split(","))]
        redis = Sentinel(addresses).master_for(name, decode_responses=True)
    else:
        redis = Redis(host=url.hostname, port=url.port or 6379,
                      db=int((url.path or "/0")[1:] or 0), decode_responses=True)
    client = ByaiGatewayClient(registry=WorkerRegistry(redis), redis_client=redis)
    session_id = f"py-{uuid.uuid4().hex[:12]}"
    if args.mode == "call-agent":
        return await call_agent(args, url, redis, client, session_id)
    if args.mode == "serve-translator":
        return await serve_translator(args, url)
    if args.mode == "resume":
        sent = await client.send_message(
            args.agent_type, args.session, args.text, action_type="RESUME",
            parent_message_id=args.parent, tenant_id=args.tenant,
            payload={"status": "USER_REPLIED", "reply_data": {"user_input": args.text}})
        print(json.dumps({"success": sent.success, "message_id": sent.message_id}))
        await redis.aclose()
        return
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


def caller_worker(capability, target):
    class Caller(GatewayWorker):
        """A Python agent that delegates to one of gatewayd's agents."""

        def get_capabilities(self):
            return [capability]

        async def process_command(self, command, context):
            if isinstance(command, ResumeCommand):
                await context.emit_chunk(json.dumps({"status": command.status,
                                                     "reply_data": command.reply_data}))
                return {"delegated": True}
            await context.call_agent(target, command.content)
            return {"waiting_for": target}

    return Caller


class PyTranslator(GatewayWorker):
    """A Python agent our agents call: upper-cases the text."""

    def get_capabilities(self):
        return ["translator"]

    async def process_command(self, command, context):
        text = command.content if isinstance(command.content, str) else json.dumps(command.content)
        await context.emit_chunk(text.upper())
        return {"translation": text.upper(), "language": "py"}


async def serve_translator(args, url):
    workspace = tempfile.TemporaryDirectory(prefix="byclaw-interop-")
    await _run_worker_async(
        PyTranslator, args.text, url.hostname, url.port or 6379,
        int((url.path or "/0")[1:] or 0), None, None, workspace.name,
        "agent_engines", max_concurrency=4, fetch_count=4)


async def call_agent(args, url, redis, client, session_id):
    capability = f"py-caller-{uuid.uuid4().hex[:8]}"
    worker_id = f"py-worker-{uuid.uuid4().hex[:8]}"
    workspace = tempfile.TemporaryDirectory(prefix="byclaw-interop-")
    worker = asyncio.create_task(_run_worker_async(
        caller_worker(capability, args.agent_type), worker_id, url.hostname, url.port or 6379,
        int((url.path or "/0")[1:] or 0), None, None, workspace.name,
        "agent_engines", max_concurrency=4, fetch_count=4))
    try:
        deadline = time.monotonic() + args.timeout
        while not await redis.sismember(f"byai_gateway:registry:capability:workers:{capability}",
                                        worker_id):
            if time.monotonic() > deadline or worker.done():
                raise TimeoutError("the Python worker did not register")
            await asyncio.sleep(0.05)
        sent = await client.send_message(capability, session_id, args.text)
        if not sent.success:
            raise RuntimeError("send_message to the Python worker failed")
        # The caller completes its first turn, our agent answers, the caller
        # is resumed and streams the reply: wait for that chunk, then its end.
        seen_reply = []

        def done(event):
            delta = event["data"]["choices"][0]["delta"]
            if event["event_type"] == "answerDelta" and event["source_agent_id"] == capability:
                seen_reply.append(json.loads(delta["content"]))
            return bool(seen_reply) and is_terminal(event)

        events = await read_events(redis, session_id, args.timeout, stop=done)
        out = summary(session_id, sent.message_id, events)
        out["caller"] = capability
        out["reply"] = seen_reply[0]
        print(json.dumps(out))
    finally:
        worker.cancel()
        try:
            await worker
        except BaseException:
            pass
        await redis.zrem("byai_gateway:registry:active_workers", worker_id)
        await redis.delete(f"byai_gateway:registry:worker:capabilities:{worker_id}",
                           f"byai_gateway:registry:capability:workers:{capability}",
                           f"byai_gateway:registry:worker:lock:{worker_id}",
                           RedisKeys.ctrl_stream(capability),
                           RedisKeys.session_data_stream(session_id),
                           f"byai_gateway:session:{session_id}:registry")
        await redis.aclose()
        workspace.cleanup()


asyncio.run(main())
