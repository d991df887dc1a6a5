"""{{name}}: a gatewayd agent made from the Python template (componentize-py).

It counts the words of what it is told with its own tool `word_count`
(declared with a JSON Schema in the manifest; other agents may call it too),
then answers "You said: ..." word by word, one chunk per word.
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import emit, tools, types

# The plugin id, and the agent type it serves.
NAME = "{{name}}"

WORD_COUNT_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "The text to count the words of"},
    },
    "required": ["text"],
    "additionalProperties": False,
}


def text_of(content: str) -> str:
    """The text of `command.content`: a JSON string, or a list of messages
    (then the last user message's content)."""
    value = json.loads(content)
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if not isinstance(value, list):
        return json.dumps(value)
    if not value:
        return ""
    users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
    message = users[-1] if users else value[-1]
    body = message.get("content", message) if isinstance(message, dict) else message
    if isinstance(body, dict):
        body = body.get("text")
    return body if isinstance(body, str) else ""


class Handler(exports.Handler):
    def describe(self) -> types.Manifest:
        return types.Manifest(
            id=NAME,
            version="0.1.0",
            description='Answers "You said: ..." word by word, after counting the words with its tool word_count',
            capabilities=[NAME],
            tools=[
                types.Tool(
                    name="word_count",
                    description="Counts the words of a text",
                    input_schema=json.dumps(WORD_COUNT_SCHEMA),
                )
            ],
            prompts=[],
            workspace=False,
        )

    def handle(self, command: types.Command) -> str:
        text = text_of(command.content)
        emit.emit_state("COUNTING")
        # Through the host, as any agent calls a tool: it checks the arguments
        # against the schema and runs the tool in a sandbox of its own. An
        # error is raised as Err and ends the task with FAILED.
        counted = json.loads(tools.call_tool("word_count", json.dumps({"text": text})))
        answer = f"You said: {text}"
        # Each word with the spaces after it: the chunks add up to the answer.
        for word in re.findall(r"\S+\s*|\s+", answer):
            emit.emit_chunk(word)
        return json.dumps({"answer": answer, "words": counted["words"]})

    def invoke_tool(self, name: str, args: str) -> str:
        if name == "word_count":
            text = json.loads(args).get("text")
            if not isinstance(text, str):
                raise Err(types.Error_InvalidInput("`text` (a string) is required"))
            return json.dumps({"words": len(text.split())})
        raise Err(types.Error_NotFound(f"tool {name}"))
