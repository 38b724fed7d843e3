// Exercises the JavaScript SDK (sdk/js) from inside a component, for
// tests/all/wasm_languages.rs: every method shows one promise of the SDK. The same
// methods exist in tests/guests/sdk-py, so one test drives both.

import { handle, state, call, log, Fail } from '../../../sdk/js/understudy.js';

const decoder = new TextDecoder();

// Each transaction runs in a fresh instance, so this counter is 1 whenever `count`
// returns it: nothing in linear memory outlives a call.
let calls = 0;

export const handler = handle({
  count: () => ++calls,
  echo: (args) => args,
  raw: () => new TextEncoder().encode('{"raw":true}'),
  'not-json': () => ({ set: new Set([1, 2]) }),
  nothing: () => undefined,
  put: (args) => {
    state.put(args.key, args.value);
  },
  get: (args) => state.get(args.key),
  delete: (args) => {
    state.delete(args.key);
  },
  scan: (args) => state.scanPrefix(args.prefix).map(([key, value]) => [decoder.decode(key), value]),
  'put-then-fail': (args) => {
    state.put(args.key, args.value);
    throw new Fail(args.code, args.message);
  },
  'put-bad-state': (args) => {
    state.putBytes(args.key, new TextEncoder().encode('not json'));
    return state.get(args.key);
  },
  'put-not-json': (args) => {
    state.put(args.key, NaN);
  },
  crash: (args) => {
    state.put('crashed', true);
    throw new RangeError(`boom: ${args.why}`);
  },
  call: (args) => call(args.function, args.method, args.input ?? null),
  'call-caught': (args) => {
    try {
      return { answer: call(args.function, args.method, args.input ?? null) };
    } catch (e) {
      if (e instanceof Fail) return { caught: e.code };
      throw e;
    }
  },
  log: (args) => {
    log.info(args.message);
  },
});
