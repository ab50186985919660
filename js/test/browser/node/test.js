// node:test for the parity suite in a browser: test(name, [options], fn) and after(fn) register; the page's runner
// (../parity-runner.js) then calls runTests(), which runs them in order like `node --test` does for one file.
const tests = [];
const afters = [];
export function test(name, options, fn) {
  if (typeof options === 'function') [options, fn] = [{}, options];
  tests.push({ name, options: options ?? {}, fn });
}
export const it = test;
export const after = (fn) => afters.push(fn);
export const before = (fn) => tests.push({ name: '(before)', options: {}, fn, hook: true });

/** Runs the registered tests; `skip(name)` returns a reason to skip a test in this environment, or false. */
export async function runTests(skip = () => false) {
  const results = [];
  for (const t of tests) {
    const why = t.options.skip || skip(t.name);
    if (why) {
      results.push({ name: t.name, status: 'skip', reason: String(why) });
      continue;
    }
    const start = performance.now();
    const diagnostics = [];
    if (globalThis.__kilnFs?.verbose) console.log(`parity: start ${t.name}`);
    try {
      await t.fn({ name: t.name, diagnostic: (m) => diagnostics.push(String(m)) });
      results.push({ name: t.name, status: 'pass', ms: Math.round(performance.now() - start), diagnostics });
    } catch (e) {
      results.push({ name: t.name, status: 'fail', ms: Math.round(performance.now() - start), error: String((e && e.stack) || e), diagnostics });
    }
  }
  for (const f of afters) await f();
  return results;
}
export default test;
