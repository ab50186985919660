// npm run size: what a browser downloads, raw and gzip -9, for kiln-web (its wasm, the wasm-bindgen glue, lib/ and
// the onnxruntime-common ES modules it ships) next to onnxruntime-web 1.30.0's files (node_modules): its wasm-only
// build and its default build with WebGPU (JSEP; ort.bundle.min.mjs loads ort-wasm-simd-threaded.jsep.*).
// Needs `npm run build` first.
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

const js = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const ortDist = path.join(js, 'node_modules/onnxruntime-web/dist');
const size = (f) => {
  const b = fs.readFileSync(f);
  return [b.length, zlib.gzipSync(b, { level: 9 }).length];
};
const walk = (dir, keep) =>
  fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? walk(p, keep) : keep(p) ? [p] : [];
  });
const sum = (files) => files.map(size).reduce(([a, b], [c, d]) => [a + c, b + d], [0, 0]);
const mb = (n) => (n / 1e6).toFixed(2);
const rows = [
  ['kiln-web: dist/kiln_js_bg.wasm (CPU and WebGPU in one)', [path.join(js, 'dist/kiln_js_bg.wasm')]],
  ['kiln-web: JS (dist/kiln_js.js, lib/*.js, dist/onnxruntime-common/*.js)', [path.join(js, 'dist/kiln_js.js'), ...walk(path.join(js, 'lib'), (p) => p.endsWith('.js')), ...walk(path.join(js, 'dist/onnxruntime-common'), (p) => p.endsWith('.js'))]],
  ['onnxruntime-web: ort-wasm-simd-threaded.wasm (wasm build)', [path.join(ortDist, 'ort-wasm-simd-threaded.wasm')]],
  ['onnxruntime-web: ort.wasm.bundle.min.mjs (its JS)', [path.join(ortDist, 'ort.wasm.bundle.min.mjs')]],
  ['onnxruntime-web: ort-wasm-simd-threaded.jsep.wasm (WebGPU build)', [path.join(ortDist, 'ort-wasm-simd-threaded.jsep.wasm')]],
  ['onnxruntime-web: ort.bundle.min.mjs (its JS)', [path.join(ortDist, 'ort.bundle.min.mjs')]],
  ['onnxruntime-web: ort-wasm-simd-threaded.asyncify.wasm (ort.webgpu build)', [path.join(ortDist, 'ort-wasm-simd-threaded.asyncify.wasm')]],
];
console.log('| files | raw MB | gzip -9 MB |\n|---|---:|---:|');
const totals = {};
for (const [name, files] of rows) {
  const [raw, gz] = sum(files);
  totals[name] = [raw, gz];
  console.log(`| ${name} | ${mb(raw)} | ${mb(gz)} |`);
}
const pair = (a, b) => [totals[a][0] + totals[b][0], totals[a][1] + totals[b][1]];
for (const [name, [raw, gz]] of [
  ['kiln-web total (wasm + JS)', pair(rows[0][0], rows[1][0])],
  ['onnxruntime-web wasm build total', pair(rows[2][0], rows[3][0])],
  ['onnxruntime-web WebGPU (default bundle) total', pair(rows[4][0], rows[5][0])],
]) {
  console.log(`| **${name}** | ${mb(raw)} | ${mb(gz)} |`);
}
