// Unit tests of the JavaScript SDK on Node.js, with fake-host.mjs in place of the host
// (the integration tests run it inside a real component).
//
// Run: node --import ./sdk/js/test/register.mjs --test sdk/js/test/understudy.test.mjs
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';

import { Fail, call, handle, keyAfter, prefixEnd, run, state } from '../understudy.js';
import { logged, store } from './fake-host.mjs';

const enc = (text) => new TextEncoder().encode(text);
const dec = (bytes) => new TextDecoder().decode(bytes);
const table = (methods) => new Map(Object.entries(methods));

function failsWith(code, f) {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof Fail, `not a Fail: ${e}`);
    assert.equal(e.code, code, e.message);
    return e;
  }
  assert.fail(`did not fail with ${code}`);
}

beforeEach(() => {
  store.clear();
  logged.length = 0;
});

test('dispatch parses JSON and writes JSON', () => {
  const out = run(table({ echo: (args) => ({ got: args }) }), 'echo', enc('{"a": [1, 2]}'));
  assert.equal(dec(out), '{"got":{"a":[1,2]}}');
});

test('empty input is null, and undefined output is null', () => {
  const methods = table({ echo: (args) => args, nothing: () => undefined });
  assert.equal(dec(run(methods, 'echo', enc(''))), 'null');
  assert.equal(dec(run(methods, 'echo', enc(' \n'))), 'null');
  assert.equal(dec(run(methods, 'nothing', enc(''))), 'null');
});

test('an unknown method names the known ones', () => {
  const e = failsWith('unknown-method', () => run(table({ a() {}, b() {} }), 'c', enc('')));
  assert.match(e.message, /a, b/);
});

test('input that is not JSON is bad-input', () => {
  failsWith('bad-input', () => run(table({ m() {} }), 'm', enc('{')));
});

test('output JSON cannot carry is bad-output naming the method', () => {
  const cyclic = {};
  cyclic.self = cyclic;
  const bad = {
    map: () => new Map(),
    set: () => ({ s: new Set([1]) }),
    nan: () => NaN,
    fn: () => ({ f() {} }),
    big: () => 1n,
    nested: () => ({ bytes: new Uint8Array(2) }),
    cyclic: () => cyclic,
    promise: async () => 1,
  };
  for (const name of Object.keys(bad)) {
    const e = failsWith('bad-output', () => run(table(bad), name, enc('')));
    assert.match(e.message, new RegExp(`\`${name}\``));
  }
});

test('bytes pass through', () => {
  const out = run(table({ raw: () => Uint8Array.of(0, 255) }), 'raw', enc(''));
  assert.deepEqual([...out], [0, 255]);
});

test('Fail becomes the WIT error; other exceptions are logged and trap', () => {
  const h = handle({
    refuse: () => {
      throw new Fail('overdraft', 'too little');
    },
    bug: () => {
      throw new TypeError('oops');
    },
  });
  assert.throws(() => h.handle('refuse', enc('')), (e) => e.code === 'overdraft' && e.message === 'too little');
  // Not the WIT error's shape: the bindings trap on it.
  assert.throws(() => h.handle('bug', enc('')), (e) => typeof e.code !== 'string' && /oops/.test(e.message));
  assert.ok(logged.some(([level, m]) => level === 'error' && /TypeError: oops/.test(m)));
});

test('state round-trips JSON', () => {
  state.put('k', { n: [1, 'x'] });
  assert.deepEqual(state.get('k'), { n: [1, 'x'] });
  assert.deepEqual(state.get(enc('k')), { n: [1, 'x'] });
  assert.equal(state.get('missing'), null);
  state.delete('k');
  assert.equal(state.get('k'), null);
});

test('state refuses what is not JSON', () => {
  failsWith('bad-output', () => state.put('k', new Map()));
  state.putBytes('b', enc('not json'));
  failsWith('bad-state', () => state.get('b'));
});

test('host errors arrive as Fail with the host code', () => {
  failsWith('limit', () => state.put('k', 'x'.repeat(200)));
  failsWith('unknown-function', () => call('nowhere', 'm', null));
});

test('scanPrefix stays within the prefix, and pages with keyAfter', () => {
  for (const key of ['a/1', 'a/2', 'b/1']) state.put(key, key);
  const all = state.scanPrefix('a/').map(([k, v]) => [dec(k), v]);
  assert.deepEqual(all, [['a/1', 'a/1'], ['a/2', 'a/2']]);
  const page = state.scan('a/', prefixEnd('a/'), 1);
  assert.equal(page.length, 1);
  const next = state.scan(keyAfter(page[0][0]), prefixEnd('a/'), 10).map(([k]) => dec(k));
  assert.deepEqual(next, ['a/2']);
});

test('prefixEnd', () => {
  assert.equal(dec(prefixEnd('acct/')), 'acct0');
  assert.deepEqual([...prefixEnd(Uint8Array.of(0x61, 0xff))], [0x62]);
  assert.equal(prefixEnd(Uint8Array.of(0xff, 0xff)), null);
  assert.equal(prefixEnd(''), null);
});

test('call writes and reads JSON', () => {
  assert.deepEqual(call('bank', 'balance', { account: 'a' }), {
    fn: 'bank',
    method: 'balance',
    input: { account: 'a' },
  });
  failsWith('bad-output', () => call('bank', 'balance', { s: new Set() }));
});
