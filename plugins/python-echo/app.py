"""A gatewayd agent in Python (componentize-py): answers in upper case.

Build (from this directory, with componentize-py installed):

    componentize-py -d ../../wit -w agent componentize app -o ../../plugins-out/python-echo.wasm
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import emit, types


class Handler(exports.Handler):
    def describe(self) -> types.Manifest:
        return types.Manifest(
            id="python-echo",
            version="0.1.0",
            description="Echoes the input in upper case, from Python",
            capabilities=["python-echo"],
            tools=[],
            prompts=[],
            workspace=False,
        )

    def handle(self, command: types.Command) -> str:
        content = json.loads(command.content)
        text = content if isinstance(content, str) else json.dumps(content)
        emit.emit_state("SHOUTING")
        emit.emit_chunk(text.upper())
        return json.dumps({"echo": text, "language": "python"})

    def invoke_tool(self, name: str, args: str) -> str:
        raise Err(types.Error_NotFound(name))
