// Write Understudy functions in JavaScript.
//
// A function is a WebAssembly component built with componentize-js against the WIT
// world in `wit/`. This module wraps that world so that a function is a set of
// methods taking and returning JSON values:
//
//     import { handler, state, Fail } from './understudy.js';
//
//     function increment(args) {
//       const value = (state.get('count') ?? 0) + (args?.by ?? 1);
//       state.put('count', value);
//       return { value };
//     }
//
//     // componentize-js looks for the export `handler`.
//     export const handler = handle({ increment });
//
// Everything one invocation does (state reads and writes, calls to other functions and
// what they do) is one transaction: it commits when the method returns, and is rolled
// back when the method throws.
//
// - Input is JSON; an empty body arrives as `null`. Input that is not JSON fails with
//   code `bad-input`, a method not listed with `unknown-method`.
// - The method's return value is written as JSON (a `Uint8Array` is sent as it is;
//   `undefined` is `null`). Anything JSON cannot carry faithfully (a function, a
//   symbol, a BigInt, NaN or Infinity, a Map or Set, a typed array inside a value, a
//   cycle) fails with code `bad-output` naming the method, and the transaction is
//   rolled back.
// - `throw new Fail(code, message)` aborts the transaction and answers the client with
//   that code (HTTP 422; 400 for `bad-input`). Errors from the host (`limit`,
//   `unknown-function`, `call-not-granted`, ...) arrive as `Fail` too, so letting one
//   propagate passes its code on.
// - Any other exception is a bug: its stack is logged and printed to stderr, and the
//   instance traps (HTTP 500, code `trap`, with the end of stderr in the message).

import * as hostState from 'understudy:function/state@0.1.0';
import { invoke } from 'understudy:function/call@0.1.0';
import { log as hostLog } from 'understudy:function/log@0.1.0';

/** A refusal: a short machine-readable `code` and a `message` for people. */
export class Fail extends Error {
  constructor(code, message = '') {
    super(String(message));
    this.name = 'Fail';
    this.code = String(code);
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder('utf-8', { fatal: true });

/**
 * The component's export: `export const handler = handle({ open, deposit })`. Each
 * method takes the parsed JSON input (`null` for an empty body) and returns a
 * JSON-able value or a `Uint8Array`. A method may be async: its promise is awaited.
 */
export function handle(methods) {
  const table = new Map(Object.entries(methods));
  return {
    handle(method, input) {
      try {
        return run(table, method, input);
      } catch (e) {
        if (e instanceof Fail) {
          // The shape componentize-js turns into the WIT `error` of `err`.
          throw { code: e.code, message: e.message };
        }
        // A bug, not a refusal: trap, as a Rust panic does, after saying why where the
        // operator (log) and the client (stderr, in the trap's message) see it.
        const text = `method \`${method}\` threw: ${describe(e)}`;
        log.error(text);
        console.error(text);
        throw trap(text);
      }
    },
  };
}

/** Runs one method on one input; returns the output bytes or throws a `Fail`. */
export function run(table, method, input) {
  const fn = table.get(method);
  if (typeof fn !== 'function') {
    const known = [...table.keys()].sort().join(', ') || 'none';
    throw new Fail('unknown-method', `no method \`${method}\`; this function has: ${known}`);
  }
  let args;
  try {
    args = fromJson(input);
  } catch (e) {
    throw new Fail('bad-input', `input of \`${method}\`: ${e.message}`);
  }
  const output = fn(args);
  if (output instanceof Promise) {
    throw new Fail('bad-output', `method \`${method}\` returned a Promise: methods are synchronous (so are state and calls)`);
  }
  if (isBytes(output)) return output;
  return toJson(output, `method \`${method}\` returned a value that`);
}

/** The function's own ordered key-value state, with JSON values. */
export const state = {
  /** The JSON value at `key`, or `null` when there is none. */
  get(key) {
    const raw = state.getBytes(key);
    return raw === undefined ? null : decodeState(key, raw);
  },
  /** Stores `value` as JSON at `key`. */
  put(key, value) {
    state.putBytes(key, toJson(value, `the value for key ${JSON.stringify(String(key))}`));
  },
  /** Removes `key`; removing a missing key is not an error. */
  delete(key) {
    host(() => hostState.delete(keyBytes(key)));
  },
  /**
   * `[key, value]` pairs with `start <= key < end` in key order, at most `limit` of
   * them (the host may return fewer: only an empty page means the end). Keys come back
   * as `Uint8Array`; `end` undefined or null means no upper bound.
   */
  scan(start, end, limit = 1000) {
    return state.scanBytes(start, end, limit).map(([k, v]) => [k, decodeState(k, v)]);
  },
  /** `scan` over the keys that start with `prefix`. */
  scanPrefix(prefix, limit = 1000) {
    return state.scan(prefix, prefixEnd(prefix), limit);
  },
  /** The bytes at `key`, or `undefined`. */
  getBytes(key) {
    return host(() => hostState.get(keyBytes(key)));
  },
  /** Stores `value` (a Uint8Array) at `key`. */
  putBytes(key, value) {
    host(() => hostState.put(keyBytes(key), value));
  },
  /** `scan` with the values as bytes. */
  scanBytes(start, end, limit = 1000) {
    const upper = end === undefined || end === null ? undefined : keyBytes(end);
    const entries = host(() => hostState.scan(keyBytes(start), upper, limit));
    return entries.map((e) => [e.key, e.value]);
  },
};

/** The first key after every key starting with `prefix`, or `null` if none is. */
export function prefixEnd(prefix) {
  const bytes = keyBytes(prefix);
  let last = bytes.length - 1;
  while (last >= 0 && bytes[last] === 0xff) last -= 1;
  if (last < 0) return null;
  const end = bytes.slice(0, last + 1);
  end[last] += 1;
  return end;
}

/** The first key after `key`: where the next page of a scan starts. */
export function keyAfter(key) {
  const bytes = keyBytes(key);
  const next = new Uint8Array(bytes.length + 1);
  next.set(bytes);
  return next;
}

/**
 * Invokes `method` of `fn` with `input` as JSON inside this transaction and returns its
 * output parsed as JSON (`null` for empty output).
 */
export function call(fn, method, input = null) {
  const body = toJson(input, `the input of a call to \`${fn}\` method \`${method}\``);
  const output = callBytes(fn, method, body);
  try {
    return fromJson(output);
  } catch (e) {
    throw new Fail('bad-output', `output of \`${fn}\` method \`${method}\`: ${e.message}`);
  }
}

/** Like `call`, with the input and output as bytes. */
export function callBytes(fn, method, input) {
  return host(() => invoke(fn, method, input));
}

/** Logging into the node's log, tagged with the function and the transaction. */
export const log = {
  trace: (message) => hostLog('trace', String(message)),
  debug: (message) => hostLog('debug', String(message)),
  info: (message) => hostLog('info', String(message)),
  warn: (message) => hostLog('warn', String(message)),
  error: (message) => hostLog('error', String(message)),
};

function host(f) {
  try {
    return f();
  } catch (e) {
    // componentize-js throws a WIT `err` as an Error whose `payload` is the record.
    const payload = e?.payload;
    if (payload && typeof payload.code === 'string') throw new Fail(payload.code, payload.message);
    throw e;
  }
}

function keyBytes(key) {
  if (typeof key === 'string') return encoder.encode(key);
  if (isBytes(key)) return key;
  throw new TypeError(`a key is a string or a Uint8Array, not ${typeName(key)}`);
}

// By tag, not `instanceof`: arrays made by the bindings fail `instanceof Uint8Array`.
function isBytes(value) {
  return Object.prototype.toString.call(value) === '[object Uint8Array]';
}

function fromJson(bytes) {
  const text = decoder.decode(bytes);
  return text.trim() === '' ? null : JSON.parse(text);
}

/** `value` as JSON bytes, or a `bad-output` Fail saying what JSON cannot carry. */
function toJson(value, what) {
  let text;
  try {
    text = JSON.stringify(value === undefined ? null : value, strict);
  } catch (e) {
    throw new Fail('bad-output', `${what} is not JSON: ${e.message}`);
  }
  return encoder.encode(text);
}

// A JSON.stringify replacer that refuses what JSON would silently change or drop.
function strict(key, value) {
  const where = key === '' ? 'the value' : `field ${JSON.stringify(key)}`;
  switch (typeof value) {
    case 'function':
    case 'symbol':
    case 'bigint':
      throw new TypeError(`${where} is a ${typeof value}`);
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`${where} is ${value}`);
      return value;
    case 'object':
      if (value instanceof Map || value instanceof Set || ArrayBuffer.isView(value) || value instanceof ArrayBuffer) {
        throw new TypeError(`${where} is a ${typeName(value)}`);
      }
      return value;
    default:
      return value;
  }
}

function decodeState(key, raw) {
  try {
    return JSON.parse(decoder.decode(raw));
  } catch (e) {
    const shown = typeof key === 'string' ? key : new TextDecoder().decode(keyBytes(key));
    throw new Fail('bad-state', `value at key ${JSON.stringify(shown)}: ${e.message}`);
  }
}

function typeName(value) {
  if (value === null) return 'null';
  return value?.constructor?.name ?? typeof value;
}

function describe(e) {
  if (e instanceof Error) return e.stack ? `${e.name}: ${e.message}\n${e.stack}` : `${e.name}: ${e.message}`;
  try {
    return JSON.stringify(e);
  } catch {
    return String(e);
  }
}

// A value the bindings cannot turn into the WIT `error` record, so that throwing it
// traps instead of answering.
function trap(text) {
  return { code: undefined, message: text };
}
