// Runs the parity suite (test/parity.mjs, unchanged) in a page or a module Web Worker. The test server maps the
// suite's node: imports to the shims in ./node/ (test, assert/strict, fs, path, url); this file supplies the two
// globals it uses (Buffer.from(string, 'utf8') and readFileSync's Buffer, process.env) and the server's file listing.
//   entry: the package's module URL (kiln-web's lib/browser.js or onnxruntime-web's bundle), KILN_PARITY_IMPL
//   ep:    'wasm' | 'webgpu', KILN_PARITY_EP
//   skip:  { 'regexp on test names': 'reason' } tests this environment leaves out
// Returns { results: [{name, status, ms, error?, reason?}], out: the records file the suite wrote }.
import { runTests } from './node/test.js';

class Buffer extends Uint8Array {
  static from(value, encoding) {
    if (typeof value === 'string') {
      if (encoding && !/^utf-?8$/i.test(encoding)) throw new Error(`Buffer shim: encoding ${encoding}`);
      const b = new TextEncoder().encode(value);
      return new Buffer(b.buffer, b.byteOffset, b.byteLength);
    }
    return super.from(value);
  }
  #view() {
    return new DataView(this.buffer, this.byteOffset, this.byteLength);
  }
  readFloatLE(offset = 0) {
    return this.#view().getFloat32(offset, true);
  }
  readDoubleLE(offset = 0) {
    return this.#view().getFloat64(offset, true);
  }
  toString(encoding) {
    if (encoding === undefined || /^utf-?8$/i.test(encoding)) return new TextDecoder().decode(this);
    throw new Error(`Buffer shim: encoding ${encoding}`);
  }
}

export async function runParity({ entry, ep, skip = {} }) {
  const listing = await (await fetch('/__listing')).json();
  globalThis.Buffer = Buffer;
  globalThis.process = { env: { KILN_PARITY_IMPL: entry, KILN_PARITY_EP: ep, KILN_PARITY_OUT: '/__out/records.json' } };
  globalThis.__kilnFs = { listing: new Map(Object.entries(listing)), written: {}, verbose: true };
  const start = performance.now();
  await import('/repo/js/test/parity.mjs');
  const patterns = Object.entries(skip).map(([re, why]) => [new RegExp(re), why]);
  const results = await runTests((name) => patterns.find(([re]) => re.test(name))?.[1] ?? false);
  const out = globalThis.__kilnFs.written['/__out/records.json'];
  return { results, out: out ? JSON.parse(out) : null, ms: Math.round(performance.now() - start) };
}
