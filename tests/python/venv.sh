#!/usr/bin/env bash
# Creates (once) a venv with the reference Python SDK from PyPI and prints its
# python on the last line. The SDK declares Python >= 3.12; its code runs on
# 3.11, hence --ignore-requires-python.
set -euo pipefail
venv=${BYCLAW_PY_VENV:-${TMPDIR:-/tmp}/byclaw-gateway-py-venv}
if ! "$venv/bin/python" -c 'import byclaw_gateway_sdk' >/dev/null 2>&1; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python byclaw-gateway-sdk >&2
fi
echo "$venv/bin/python"
