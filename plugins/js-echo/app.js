// A gatewayd agent in JavaScript: streams the input back in words and
// returns it, like plugins/echo.
import { emitChunk, emitState } from 'byclaw:gateway/emit@0.1.0';

function text(content) {
  const value = JSON.parse(content);
  if (typeof value === 'string') return value;
  if (Array.isArray(value)) {
    const user = [...value].reverse().find((m) => m && m.role === 'user') ?? value[value.length - 1];
    const c = user?.content;
    return typeof c === 'string' ? c : (c?.text ?? '');
  }
  return JSON.stringify(value);
}

export const handler = {
  describe() {
    return {
      id: 'js-echo',
      version: '0.1.0',
      description: 'Streams the input back, written in JavaScript',
      capabilities: ['js-echo'],
      tools: [],
      prompts: [],
      workspace: false,
    };
  },
  handle(command) {
    const input = text(command.content);
    emitState('ECHOING');
    const words = input.split(/(\s+)/).filter((w) => w.length > 0);
    for (const word of words) emitChunk(word);
    return JSON.stringify({ echo: input, language: 'javascript' });
  },
  invokeTool(name, _args) {
    throw { tag: 'not-found', val: `tool ${name}` };
  },
};
