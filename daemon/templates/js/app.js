// {{name}}: a gatewayd agent made from the JavaScript template (jco +
// componentize-js).
//
// It counts the words of what it is told with its own tool `word_count`
// (declared with a JSON Schema in the manifest; other agents may call it
// too), then answers "You said: ..." word by word, one chunk per word.
import { emitChunk, emitState } from 'byclaw:gateway/emit@0.1.0';
import { callTool } from 'byclaw:gateway/tools@0.1.0';

// The plugin id, and the agent type it serves.
const NAME = '{{name}}';

const WORD_COUNT_SCHEMA = {
  type: 'object',
  properties: {
    text: { type: 'string', description: 'The text to count the words of' },
  },
  required: ['text'],
  additionalProperties: false,
};

// The text of `command.content`: a JSON string, or a list of messages (then
// the last user message's content).
function textOf(content) {
  const value = JSON.parse(content);
  if (typeof value === 'string') return value;
  if (value === null) return '';
  if (!Array.isArray(value)) return JSON.stringify(value);
  if (value.length === 0) return '';
  const users = value.filter((m) => m && typeof m === 'object' && m.role === 'user');
  const message = users.length > 0 ? users[users.length - 1] : value[value.length - 1];
  let body = message && typeof message === 'object' && 'content' in message ? message.content : message;
  if (body && typeof body === 'object') body = body.text;
  return typeof body === 'string' ? body : '';
}

export const handler = {
  describe() {
    return {
      id: NAME,
      version: '0.1.0',
      description: 'Answers "You said: ..." word by word, after counting the words with its tool word_count',
      capabilities: [NAME],
      tools: [
        {
          name: 'word_count',
          description: 'Counts the words of a text',
          inputSchema: JSON.stringify(WORD_COUNT_SCHEMA),
        },
      ],
      prompts: [],
      workspace: false,
    };
  },

  handle(command) {
    const text = textOf(command.content);
    emitState('COUNTING');
    // Through the host, as any agent calls a tool: it checks the arguments
    // against the schema and runs the tool in a sandbox of its own. Its
    // error comes back as an exception carrying the WIT error; rethrown as
    // one, it ends the task with FAILED.
    let counted;
    try {
      counted = JSON.parse(callTool('word_count', JSON.stringify({ text })));
    } catch (error) {
      throw error?.payload ?? { tag: 'failed', val: `word_count: ${error}` };
    }
    const answer = `You said: ${text}`;
    // Each word with the spaces after it: the chunks add up to the answer.
    for (const word of answer.match(/\S+\s*|\s+/g) ?? []) emitChunk(word);
    return JSON.stringify({ answer, words: counted.words });
  },

  invokeTool(name, args) {
    if (name === 'word_count') {
      const { text } = JSON.parse(args);
      if (typeof text !== 'string') throw { tag: 'invalid-input', val: '`text` (a string) is required' };
      return JSON.stringify({ words: text.split(/\s+/).filter((w) => w.length > 0).length });
    }
    throw { tag: 'not-found', val: `tool ${name}` };
  },
};
