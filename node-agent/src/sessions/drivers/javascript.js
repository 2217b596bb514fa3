// Kowalski Exo session driver for JavaScript (Node.js): runs the cells the node agent sends over
// the channel (a socket at the descriptor given as the first argument) in one global scope, and
// relays llm_query and rlm_query calls to the agent over the same channel. Frames as in the Python driver:
// a header line "KIND ID LENGTH\n", then LENGTH bytes of payload.
'use strict';
const net = require('net');
const util = require('util');
const vm = require('vm');

const [channelFd, maxFrame] = process.argv.slice(-2).map(Number);
const channel = new net.Socket({ fd: channelFd, readable: true, writable: true });
const pending = new Map();
const cells = [];
let nextId = 1;
let buffered = Buffer.alloc(0);
let running = false;
let cellNumber = 0;
let interruptCell = null;

function send(kind, id, payload) {
  channel.write(Buffer.concat([Buffer.from(`${kind} ${id} ${payload.length}\n`), payload]));
}

function ask(request, kind = 'llm') {
  const payload = Buffer.from(JSON.stringify(request));
  if (payload.length > maxFrame) {
    return Promise.reject(new Error(
      `llm_query: the prompts take ${payload.length} bytes, over the session's limit of ${maxFrame}`));
  }
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    send(kind, id, payload);
  }).then((answer) => {
    if (answer.error !== undefined) throw new Error(`llm_query: ${answer.error}`);
    return answer.results.map((r) => (r.text !== undefined ? r.text : `Error: ${r.error}`));
  });
}

globalThis.llm_query = async (prompt, model, options) =>
  (await ask({ prompts: [String(prompt)], model: model || '', options: options || {} }))[0];
globalThis.llm_query_batched = async (prompts, model, options) =>
  prompts.length === 0 ? [] :
    ask({ prompts: prompts.map(String), model: model || '', options: options || {} });

// A child run's context: a string as it is, anything else as JSON.
const contextText = (context) =>
  (context === undefined || context === null ? '' :
    typeof context === 'string' ? context : JSON.stringify(context));
globalThis.rlm_query = async (prompt, context, model) =>
  (await ask({ prompts: [String(prompt)], contexts: [contextText(context)], model: model || '' },
    'rlm'))[0];
globalThis.rlm_query_batched = async (prompts, contexts, model) => {
  if (prompts.length === 0) return [];
  const texts = (contexts || prompts.map(() => null)).map(contextText);
  if (texts.length !== prompts.length) {
    throw new Error('rlm_query_batched: give one context per prompt');
  }
  return ask({ prompts: prompts.map(String), contexts: texts, model: model || '' }, 'rlm');
};

// Between cells an interrupt does nothing; during an awaited cell it ends the wait.
process.on('SIGINT', () => {
  if (interruptCell) interruptCell();
});

// The error's message and the frames inside cells; the driver's own frames are left out.
function report(error) {
  if (!(error instanceof Error) || !error.stack) return `Uncaught ${util.inspect(error)}`;
  const lines = error.stack.split('\n');
  const isFrame = (line) => /^\s+at /.test(line);
  return lines.filter((line) => !isFrame(line) || /cell \d+/.test(line)).join('\n');
}

async function runCell(id, code) {
  cellNumber += 1;
  let outcome;
  try {
    let value = vm.runInThisContext(code, { filename: `cell ${cellNumber}`, breakOnSigint: true });
    if (value && typeof value.then === 'function') {
      value = await new Promise((resolve, reject) => {
        interruptCell = () => reject(new Error('Script execution was interrupted by `SIGINT`'));
        value.then(resolve, reject);
      });
    }
    if (value !== undefined) console.log(util.inspect(value));
    outcome = { status: 'ok' };
  } catch (error) {
    process.stderr.write(`${report(error)}\n`);
    const interrupted = /interrupted by `SIGINT`/.test(String(error && error.message));
    outcome = interrupted ? { status: 'interrupted' } :
      { status: 'error', error: String(error && error.message !== undefined ? `${error.name}: ${error.message}` : error) };
  } finally {
    interruptCell = null;
  }
  send('done', id, Buffer.from(JSON.stringify(outcome)));
}

async function drain() {
  if (running) return;
  running = true;
  while (cells.length > 0) {
    const [id, code] = cells.shift();
    await runCell(id, code);
  }
  running = false;
}

channel.on('data', (chunk) => {
  buffered = Buffer.concat([buffered, chunk]);
  for (;;) {
    const newline = buffered.indexOf(10);
    if (newline < 0) return;
    const [kind, id, length] = buffered.subarray(0, newline).toString().split(' ');
    const end = newline + 1 + Number(length);
    if (buffered.length < end) return;
    const payload = buffered.subarray(newline + 1, end);
    buffered = buffered.subarray(end);
    if (kind === 'exec') {
      cells.push([Number(id), payload.toString()]);
      drain();
    } else if (kind === 'result' && pending.has(Number(id))) {
      pending.get(Number(id)).resolve(JSON.parse(payload.toString()));
      pending.delete(Number(id));
    }
  }
});
channel.on('end', () => process.exit(0));
channel.on('error', () => process.exit(0));
send('ready', 0, Buffer.from(JSON.stringify({ version: process.versions.node })));
