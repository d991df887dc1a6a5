#!/usr/bin/env bash
# Creates (once) a venv with the reference Python SDK, componentize-py and
# asyncpg (the driver of the SDK's PostgresHistoryStorage) from PyPI and
# prints its python on the last line. The SDK declares Python >= 3.12; its code runs on
# 3.11, hence --ignore-requires-python.
set -euo pipefail
venv=${BYCLAW_PY_VENV:-${TMPDIR:-/tmp}/byclaw-gateway-py-venv}
# Also componentize-py, which builds Python agents into components.
if ! "$venv/bin/python" -c 'import byclaw_gateway_sdk, asyncpg' >/dev/null 2>&1 || [ ! -x "$venv/bin/componentize-py" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python \
    byclaw-gateway-sdk componentize-py==0.25.1 asyncpg==0.32.0 >&2
fi
echo "$venv/bin/python"
