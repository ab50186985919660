// node:assert/strict for the parity suite in a browser: ok, equal, notEqual, deepEqual (deepStrictEqual semantics:
// Object.is for primitives, same prototypes, typed arrays element by element), throws, rejects, fail.
export class AssertionError extends Error {}
const show = (v) => {
  try {
    return typeof v === 'bigint' ? `${v}n` : JSON.stringify(v, (_, x) => (typeof x === 'bigint' ? `${x}n` : ArrayBuffer.isView(x) ? Array.from(x, String) : x)) ?? String(v);
  } catch {
    return String(v);
  }
};
const fail = (message, fallback) => {
  throw message instanceof Error ? message : new AssertionError(message ?? fallback);
};
function same(a, b) {
  if (Object.is(a, b)) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
  if (ArrayBuffer.isView(a)) return a.length === b.length && Array.prototype.every.call(a, (x, i) => Object.is(x, b[i]));
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && same(a[k], b[k]));
}
function assert(value, message) {
  if (!value) fail(message, `${show(value)} == true`);
}
assert.ok = assert;
assert.equal = (a, b, message) => Object.is(a, b) || fail(message, `${show(a)} !== ${show(b)}`);
assert.strictEqual = assert.equal;
assert.notEqual = (a, b, message) => !Object.is(a, b) || fail(message, `${show(a)} === ${show(b)}`);
assert.deepEqual = (a, b, message) => same(a, b) || fail(message, `not deep-equal:\n${show(a)}\n${show(b)}`);
assert.deepStrictEqual = assert.deepEqual;
assert.notDeepEqual = (a, b, message) => !same(a, b) || fail(message, `deep-equal: ${show(a)}`);
assert.fail = (message) => fail(message, 'Failed');
assert.throws = (f, _expected, message) => {
  try {
    f();
  } catch {
    return;
  }
  fail(typeof _expected === 'string' ? _expected : message, 'Missing expected exception.');
};
assert.rejects = async (p, _expected, message) => {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch {
    return;
  }
  fail(typeof _expected === 'string' ? _expected : message, 'Missing expected rejection.');
};
assert.AssertionError = AssertionError;
assert.strict = assert;
export default assert;
export const { ok, equal, notEqual, deepEqual, strictEqual, deepStrictEqual, notDeepEqual, throws, rejects } = assert;
const _fail = assert.fail;
export { _fail as fail };
