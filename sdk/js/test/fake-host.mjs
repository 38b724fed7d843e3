// The WIT world's imports over a Map, for the SDK's unit tests. A host error is thrown
// as componentize-js throws it: an Error whose `payload` is the WIT `error` record.
export const store = new Map();
export const logged = [];

const hex = (bytes) => Buffer.from(bytes).toString('hex');

function hostError(code, message) {
  const e = new Error(`${code}: ${message}`);
  e.payload = { code, message };
  return e;
}

export function get(key) {
  return store.get(hex(key))?.value;
}

export function put(key, value) {
  if (value.length > 100) throw hostError('limit', 'value too large');
  store.set(hex(key), { key: Uint8Array.from(key), value: Uint8Array.from(value) });
}

function del(key) {
  store.delete(hex(key));
}
export { del as delete };

export function scan(start, end, limit) {
  return [...store.entries()]
    .filter(([k]) => k >= hex(start) && (end === undefined || k < hex(end)))
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .slice(0, limit)
    .map(([, entry]) => entry);
}

export function invoke(fn, method, input) {
  if (fn === 'nowhere') throw hostError('unknown-function', 'no function named nowhere');
  const body = { fn, method, input: JSON.parse(new TextDecoder().decode(input)) };
  return new TextEncoder().encode(JSON.stringify(body));
}

export function log(level, message) {
  logged.push([level, message]);
}
