// npm run build: the publishable package in js/dist from the Rust crate.
//   1. cargo build --release -p kiln-js --target wasm32-unknown-unknown
//   2. wasm-bindgen --target web (one glue for browsers, workers and Node; lib/node.js instantiates it from a file)
//   3. onnxruntime-common's ES modules (the API layer: Tensor, InferenceSession, env; MIT) copied to
//      dist/onnxruntime-common, so the package has no runtime dependency and loads unbundled in a browser.
// KILN_SKIP_CARGO=1 skips step 1 (the .wasm is already built). WASM_BINDGEN overrides the wasm-bindgen binary.
// KILN_KEEP_NAMES=1 keeps the wasm's name section (function names in a trap's stack trace).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

const js = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const root = path.resolve(js, '..');
const dist = path.join(js, 'dist');
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

if (process.env.KILN_SKIP_CARGO !== '1') {
  run('cargo', ['build', '--release', '-p', 'kiln-js', '--target', 'wasm32-unknown-unknown']);
}
const wasm = path.join(root, 'target/wasm32-unknown-unknown/release/kiln_js.wasm');

// wasm-bindgen must match the wasm-bindgen crate in Cargo.lock.
const lock = fs.readFileSync(path.join(root, 'Cargo.lock'), 'utf8');
const wanted = /name = "wasm-bindgen"\nversion = "([^"]+)"/.exec(lock)?.[1];
const candidates = [process.env.WASM_BINDGEN, path.join(root, 'target/wasm-bindgen-cli/bin/wasm-bindgen'), 'wasm-bindgen'];
let wbg;
for (const c of candidates.filter(Boolean)) {
  try {
    const v = execFileSync(c, ['--version'], { encoding: 'utf8' }).trim().split(' ')[1];
    if (v === wanted) {
      wbg = c;
      break;
    }
  } catch {
    // not there
  }
}
if (!wbg) {
  throw new Error(
    `wasm-bindgen ${wanted} not found: cargo install --locked wasm-bindgen-cli --version =${wanted} --root target/wasm-bindgen-cli`,
  );
}

fs.rmSync(dist, { recursive: true, force: true });
fs.mkdirSync(dist, { recursive: true });
// The wasm's name section (function names, 2.9 MB: only stack traces of a trap use it) is left out unless
// KILN_KEEP_NAMES=1.
const names = process.env.KILN_KEEP_NAMES === '1' ? [] : ['--remove-name-section'];
run(wbg, ['--target', 'web', ...names, '--out-dir', dist, '--out-name', 'kiln_js', wasm]);

const common = path.join(js, 'node_modules/onnxruntime-common');
const commonOut = path.join(dist, 'onnxruntime-common');
fs.mkdirSync(commonOut, { recursive: true });
for (const f of fs.readdirSync(path.join(common, 'dist/esm'))) {
  if (f.endsWith('.js') || f.endsWith('.d.ts')) fs.copyFileSync(path.join(common, 'dist/esm', f), path.join(commonOut, f));
}
fs.writeFileSync(path.join(commonOut, 'package.json'), JSON.stringify({ type: 'module' }) + '\n');
const commonVersion = JSON.parse(fs.readFileSync(path.join(common, 'package.json'), 'utf8')).version;
fs.writeFileSync(
  path.join(commonOut, 'NOTICE'),
  `onnxruntime-common ${commonVersion} (dist/esm), Copyright (c) Microsoft Corporation, MIT License.\n`,
);

const bytes = fs.readFileSync(path.join(dist, 'kiln_js_bg.wasm'));
const gz = zlib.gzipSync(bytes, { level: 9 }).length;
const mb = (n) => (n / 1e6).toFixed(1);
console.log(`kiln-web: dist/kiln_js_bg.wasm ${mb(bytes.length)} MB (${mb(gz)} MB gzip)`);
