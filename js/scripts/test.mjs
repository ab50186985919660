// npm test: the parity suite (test/parity.mjs) on onnxruntime-web@1.30.0, then on kiln-web, then the records of
// the two runs compared (metadata and error messages exactly, numbers within each record's tolerance); kiln-web's
// additions (test/kiln-extras.mjs); tokenizer operators and JavaScript custom operators (test/kiln-ops.mjs); the
// browser checks in headless chromium (test/browser.mjs, skipped without it): the app and the tiny fixtures on 'wasm'
// and 'webgpu' (SwiftShader), both packages, main thread and worker, kiln-web's WebGPU-only behaviour, and the parity
// suite itself on both packages on 'wasm' and 'webgpu', main thread and Web Worker, compared the same way (the
// comparison and the KNOWN lists are in test/parity-compare.mjs).
// Needs `npm run build` first (dist/). KILN_PARITY_ONLY=kiln-web runs one side without the comparison.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { KNOWN, compareRecords } from '../test/parity-compare.mjs';

const js = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
if (!fs.existsSync(path.join(js, 'dist/kiln_js_bg.wasm'))) {
  console.error('kiln-web is not built: run `npm run build` first');
  process.exit(1);
}
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-parity-'));
const impls = process.env.KILN_PARITY_ONLY ? [process.env.KILN_PARITY_ONLY] : ['onnxruntime-web', 'kiln-web'];
const outs = {};
let failed = false;
for (const impl of impls) {
  console.log(`\n=== parity suite on ${impl}`);
  outs[impl] = path.join(tmp, `${impl}.json`);
  const r = spawnSync(process.execPath, ['--test', '--test-reporter=spec', 'test/parity.mjs'], {
    cwd: js,
    stdio: 'inherit',
    env: { ...process.env, KILN_PARITY_IMPL: impl, KILN_PARITY_OUT: outs[impl] },
  });
  if (r.status !== 0) {
    console.error(`parity suite failed on ${impl}`);
    failed = true;
  }
}

if (impls.includes('kiln-web')) {
  console.log('\n=== kiln-web additions (test/kiln-extras.mjs)');
  const r = spawnSync(process.execPath, ['--test', '--test-reporter=spec', 'test/kiln-extras.mjs'], { cwd: js, stdio: 'inherit' });
  if (r.status !== 0) {
    console.error('kiln-web additions failed');
    failed = true;
  }
  console.log('\n=== kiln-web: tokenizer operators and JavaScript custom operators (test/kiln-ops.mjs)');
  const o = spawnSync(process.execPath, ['--test', '--test-reporter=spec', 'test/kiln-ops.mjs'], { cwd: js, stdio: 'inherit' });
  if (o.status !== 0) {
    console.error('kiln-web tokenizer / custom operator tests failed');
    failed = true;
  }
  console.log("\n=== headless chromium: an onnxruntime-web app and the tiny fixtures on 'wasm' and 'webgpu', import map, main thread and worker (test/browser.mjs)");
  const b = spawnSync(process.execPath, ['--test', '--test-reporter=spec', 'test/browser.mjs'], { cwd: js, stdio: 'inherit' });
  if (b.status !== 0) {
    console.error('browser tests failed');
    failed = true;
  }
}

if (impls.length === 2 && fs.existsSync(outs['onnxruntime-web']) && fs.existsSync(outs['kiln-web'])) {
  console.log('\n=== onnxruntime-web vs kiln-web records');
  const ortRecords = JSON.parse(fs.readFileSync(outs['onnxruntime-web'], 'utf8')).records;
  const kilnRecords = JSON.parse(fs.readFileSync(outs['kiln-web'], 'utf8')).records;
  const { same, lines, failed: differ } = compareRecords(ortRecords, kilnRecords, KNOWN);
  for (const line of lines) console.log(line);
  if (differ) failed = true;
  console.log(`${same} records the same on both`);
} else if (impls.length === 2) {
  failed = true;
}
fs.rmSync(tmp, { recursive: true, force: true });
console.log(failed ? '\nparity: FAILED' : '\nparity: ok');
process.exit(failed ? 1 : 0);
