"""Reads and writes session history with the reference Python SDK's own
PostgresHistoryStorage (byclaw-gateway-sdk, asyncpg), to check that gatewayd's
PostgreSQL history and the reference's are one and the same.

  python history_interop.py --dsn DSN read --session SESSION --limit N
      PostgresHistoryStorage.get_history(SESSION, N); prints
      {"history": [{"role", "content", "metadata"}, ...]}.
  python history_interop.py --dsn DSN write --session SESSION --entries JSON
      saves each entry of the JSON list, in order, through
      HistoryProvider.save_message (the worker's path: empty content is
      skipped); prints {"saved": N}.

The result is the one stdout line starting with `{` (the SDK logs to stdout too).

The storage is given a pool whose connections encode and decode json/jsonb
with the json module. The SDK's default pool (asyncpg.create_pool without
codecs) cannot save at all: asyncpg takes a jsonb parameter as text only, and
save_message passes the metadata dict ("invalid input for query argument $4:
{} (expected str, got dict)"); reads would return metadata as a JSON string.
A deployment of the reference that works therefore passes such a pool.
"""

import argparse
import asyncio
import json

import asyncpg
from byclaw_gateway_sdk.core.history import HistoryProvider, PostgresHistoryStorage


async def json_codecs(connection):
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    read = commands.add_parser("read")
    read.add_argument("--session", required=True)
    read.add_argument("--limit", type=int, default=10)
    write = commands.add_parser("write")
    write.add_argument("--session", required=True)
    write.add_argument("--entries", required=True, help="JSON list of {role, content, metadata}")
    args = parser.parse_args()

    pool = await asyncpg.create_pool(dsn=args.dsn, min_size=1, max_size=2, init=json_codecs)
    try:
        storage = PostgresHistoryStorage(connection_pool=pool)
        if args.command == "read":
            history = await storage.get_history(args.session, limit=args.limit)
            result = {"history": history}
        else:
            HistoryProvider.set_storage(storage)
            entries = json.loads(args.entries)
            for entry in entries:
                await HistoryProvider.save_message(
                    session_id=args.session,
                    role=entry["role"],
                    content=entry["content"],
                    metadata=entry.get("metadata"),
                )
            result = {"saved": len([e for e in entries if e["content"]])}
        await storage.close()
    finally:
        await pool.close()
    print(json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
