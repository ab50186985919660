// Headless Chromium (Debian's chromium through playwright-core): an app written for onnxruntime-web, loaded through
// an import map that points 'onnxruntime-web' at kiln-web, unchanged, on the main thread and in a module Web Worker;
// the same page with the import map pointing at onnxruntime-web@1.30.0 must give the same results; and the app
// bundled by Vite with 'onnxruntime-web' aliased to kiln-web. Skipped when no
// chromium is installed (CHROMIUM=/path/to/chromium overrides /usr/bin/chromium).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { KNOWN, KNOWN_BROWSER, compareRecords } from './parity-compare.mjs';

const js = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const fixtures = path.resolve(js, '../conformance/fixtures/tiny');
const tokData = path.resolve(js, '../ops/tests/data/tokenizer');
// the parity suite's files: the repository under /repo/ (parity.mjs computes its paths from its own URL, so the tiny
// fixtures are /repo/conformance/fixtures/tiny/ and ../shared/models is /shared/models/)
const repo = path.resolve(js, '..');
const sharedModels = path.resolve(repo, '../shared/models');
const dataRoots = { '/repo/conformance/fixtures/tiny': path.join(repo, 'conformance/fixtures/tiny'), '/shared/models': sharedModels };
// every directory (→ its names) and file (→ true) under the data roots: the browser fs shim's existsSync / readdirSync
function listing() {
  const out = {};
  const walk = (url, dir) => {
    let entries;
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    out[url] = entries.map((e) => e.name);
    for (const e of entries) {
      if (e.isDirectory()) walk(`${url}/${e.name}`, path.join(dir, e.name));
      else out[`${url}/${e.name}`] = true;
    }
  };
  for (const [url, dir] of Object.entries(dataRoots)) walk(url, dir);
  // the parents, so that existsSync answers for them too
  for (const url of Object.keys(dataRoots)) for (let p = path.posix.dirname(url); p !== '/'; p = path.posix.dirname(p)) out[p] ??= [];
  return out;
}
// the suite's node: imports → the browser shims (what an import map would do; module workers have no import maps)
const NODE_SHIMS = { 'node:test': 'test', 'node:assert/strict': 'assert', 'node:assert': 'assert', 'node:fs': 'fs', 'node:path': 'path', 'node:url': 'url' };
const withShims = (source) =>
  source.replace(/from '(node:[a-z/]+)'/g, (m, name) => (NODE_SHIMS[name] ? `from '/repo/js/test/browser/node/${NODE_SHIMS[name]}.js'` : m));
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const skip = !fs.existsSync(executablePath) && `no chromium at ${executablePath}`;

const ENTRIES = {
  'kiln-web': '/lib/browser.js',
  'onnxruntime-web': '/node_modules/onnxruntime-web/dist/ort.bundle.min.mjs',
};
const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html', '.json': 'application/json' };

// A protobuf encoder for the few ONNX messages streamModel writes: fields are [number, value] with value a string
// (bytes), a number (varint), a Buffer (bytes) or an array of fields (a message).
function pb(fields) {
  const parts = [];
  const varint = (v) => {
    const out = [];
    let n = BigInt(v);
    do {
      let b = Number(n & 0x7fn);
      n >>= 7n;
      if (n > 0n) b |= 0x80;
      out.push(b);
    } while (n > 0n);
    return Buffer.from(out);
  };
  for (const [field, value] of fields) {
    if (typeof value === 'number') {
      parts.push(varint(field * 8), varint(value));
      continue;
    }
    const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.isBuffer(value) ? value : pb(value);
    parts.push(varint(field * 8 + 2), varint(bytes.length), bytes);
  }
  return Buffer.concat(parts);
}

// x [1, 2048] → MatMul w0 → … → MatMul w3 → y, each w [2048, 2048] float32 in weights.bin (seeded xorshift values)
let streamed;
function streamModel() {
  if (streamed) return streamed;
  const side = 2048;
  const count = 4;
  const weights = Buffer.alloc(count * side * side * 4);
  let s = 0x9e3779b9;
  for (let i = 0; i < weights.length / 4; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    weights.writeFloatLE((((s >>> 0) / 2 ** 32) * 2 - 1) * (2 / Math.sqrt(side)), i * 4);
  }
  const tensorType = (dims) => [[1, [[1, 1], [2, dims.map((d) => [1, [[1, d]]])]]]];
  const nodes = [];
  const inits = [];
  const inline = [];
  const gemms = [];
  for (let i = 0; i < count; i++) {
    const a = i === 0 ? 'x' : `h${i}`;
    const y = i + 1 === count ? 'y' : `h${i + 1}`;
    nodes.push([1, [[1, a], [1, `w${i}`], [2, y], [3, `mm${i}`], [4, 'MatMul']]]);
    gemms.push([1, [[1, a], [1, `w${i}`], [2, y], [3, `gemm${i}`], [4, 'Gemm'], [5, [[1, 'transB'], [3, 1], [20, 2]]]]]);
    const entry = (k, v) => [13, [[1, k], [2, v]]];
    inits.push([5, [[1, side], [1, side], [2, 1], [8, `w${i}`], entry('location', 'weights.bin'), entry('offset', String(i * side * side * 4)), entry('length', String(side * side * 4)), [14, 1]]]);
    inline.push([5, [[1, side], [1, side], [2, 1], [8, `w${i}`], [9, weights.subarray(i * side * side * 4, (i + 1) * side * side * 4)]]]);
  }
  const io = [[11, [[1, 'x'], [2, tensorType([1, side])]]], [12, [[1, 'y'], [2, tensorType([1, side])]]]];
  const graph = [...nodes, [2, 'stream'], ...inits, ...io];
  streamed = {
    model: pb([[1, 8], [8, [[2, 17]]], [7, graph]]),
    weights,
    // the same weights in one file, inline, each read as Gemm's transposed B (y = x · Wᵀ: the weights as stored are
    // the one-row kernel's layout)
    single: pb([[1, 8], [8, [[2, 17]]], [7, [...gemms, [2, 'stream'], ...inline, ...io]]]),
  };
  return streamed;
}

let server;
let base;
let browser;
let viteOut;
before(async () => {
  if (skip) return;
  // the Vite build of test/vite, served under /vite/
  viteOut = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-vite-'));
  const { build } = await import('vite');
  await build({
    root: path.join(js, 'test/vite'),
    base: '/vite/',
    logLevel: 'warn',
    resolve: { alias: { 'onnxruntime-web': path.join(js, 'lib/browser.js') } },
    build: { outDir: viteOut, emptyOutDir: true, target: 'es2022' },
  });
  server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    let file;
    if (url.pathname.startsWith('/vite/')) {
      file = path.join(viteOut, url.pathname.slice('/vite/'.length) || 'index.html');
      fs.readFile(file, (err, data) => {
        if (err) return res.writeHead(404).end();
        res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' }).end(data);
      });
      return;
    }
    if (url.pathname === '/page.html') {
      const entry = ENTRIES[url.searchParams.get('impl')];
      const html = fs
        .readFileSync(path.join(js, 'test/browser/page.html'), 'utf8')
        .replace('IMPORT_MAP', JSON.stringify({ imports: { 'onnxruntime-web': entry } }))
        .replace('WORKER_ENTRY', JSON.stringify(entry));
      res.writeHead(200, { 'Content-Type': 'text/html' }).end(html);
      return;
    }
    // test/browser/webgpu-stream.html's model: 4 MatMuls, their 64 MiB of weights external (weights.bin), or inline
    // (single.onnx); ?chunked=1: sent in 1 MiB writes without Content-Length
    const files = { '/stream/model.onnx': 'model', '/stream/weights.bin': 'weights', '/stream/single.onnx': 'single' };
    if (files[url.pathname]) {
      const data = streamModel()[files[url.pathname]];
      if (!url.searchParams.has('chunked')) {
        res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': data.length }).end(data);
        return;
      }
      res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
      let pos = 0;
      const next = () => {
        if (pos >= data.length) return res.end();
        res.write(data.subarray(pos, pos + (1 << 20)), next);
        pos += 1 << 20;
      };
      next();
      return;
    }
    if (url.pathname === '/__listing') {
      res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify(listing()));
      return;
    }
    if (url.pathname.startsWith('/repo/') || url.pathname.startsWith('/shared/models/')) {
      file = url.pathname.startsWith('/repo/') ? path.join(repo, url.pathname.slice(6)) : path.join(sharedModels, url.pathname.slice(15));
      const allowed = [path.join(repo, 'js') + path.sep, path.join(repo, 'conformance/fixtures') + path.sep, sharedModels + path.sep];
      if (!allowed.some((a) => file.startsWith(a))) return res.writeHead(403).end();
      fs.readFile(file, (err, data) => {
        if (err) return res.writeHead(404).end();
        if (file.startsWith(path.join(js, 'test') + path.sep) && file.endsWith('.mjs')) data = withShims(data.toString('utf8'));
        res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' }).end(data);
      });
      return;
    }
    if (url.pathname.startsWith('/fixtures/')) file = path.join(fixtures, url.pathname.slice('/fixtures/'.length));
    else if (url.pathname.startsWith('/tok/')) file = path.join(tokData, url.pathname.slice('/tok/'.length));
    else file = path.join(js, url.pathname);
    if (!file.startsWith(js) && !file.startsWith(fixtures) && !file.startsWith(tokData)) return res.writeHead(403).end();
    fs.readFile(file, (err, data) => {
      if (err) return res.writeHead(404).end();
      res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream' }).end(data);
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${server.address().port}`;
  const { chromium } = await import('playwright-core');
  // WebGPU on: Chromium's SwiftShader adapter where the machine has no GPU (CI)
  browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--enable-unsafe-webgpu'] });
});
after(async () => {
  await browser?.close();
  server?.close();
  if (viteOut) fs.rmSync(viteOut, { recursive: true, force: true });
});

test('browser: the onnxruntime-web app bundled by Vite with the name aliased to kiln-web', { skip }, async () => {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  await page.goto(`${base}/vite/index.html`);
  await page.waitForFunction(() => window.mainThread, null, { timeout: 60000 });
  const r = await page.evaluate(() => window.mainThread);
  await page.close();
  assert.ok(!r.failure, `${r.failure}\n${logs.join('\n')}`);
  assert.equal(r.next, 614);
  assert.equal(r.error, "input 'input_ids' is missing in 'feeds'.");
  assert.ok(r.versions.kiln, 'kiln-web, not onnxruntime-web');
});

// The app and the tiny fixtures on each execution provider, on each package, main thread and worker. Each run checks
// the fixtures against their references (onnxruntime's outputs); kiln-web's run is then compared with
// onnxruntime-web's on the same provider: metadata and messages exactly, numbers within tolerance.
// 'webgpu': kiln's GPU backend on the browser's WebGPU (the session must be on it: env.webgpu.device resolves to
// kiln's GPUDevice only then) against onnxruntime-web's WebGPU EP.
// max |output - reference| per package and provider: kiln-web must match the references on both; onnxruntime-web's
// WebGPU EP is looser on SwiftShader (7.6e-3 on tiny-llama's dynamo export), the comparison uses its bound
const TOL = { 'kiln-web': { wasm: 1e-4, webgpu: 1e-4 }, 'onnxruntime-web': { wasm: 1e-4, webgpu: 2e-2 } };
// Where onnxruntime-web itself is off the reference, kiln-web is checked against the reference only (not compared
// with onnxruntime-web): its WebGPU EP gives tiny-llama's dynamo export present.0.key 0.70 away from onnxruntime's
// CPU result (SwiftShader, onnxruntime-web 1.30.0). Listed so that a change shows.
const ORT_OFF = { webgpu: ['tiny-llama/onnx_dynamo_eager_op20'], wasm: [] };
const modelOf = (key) => key.split(' ')[0];
const runs = {};
const summary = (r) => ({ next: r.next, dims: r.dims, inputs: r.inputs, error: r.error, device: r.device, more: r.more });
function close(a, b, tol, what) {
  assert.equal(a.length, b.length, `${what}: length`);
  for (let i = 0; i < a.length; i++) assert.ok(Math.abs(a[i] - b[i]) <= tol, `${what}[${i}]: ${a[i]} vs ${b[i]}`);
}
for (const ep of ['wasm', 'webgpu']) {
  for (const impl of ['onnxruntime-web', 'kiln-web']) {
    test(`browser: the onnxruntime-web app and the tiny fixtures on ${impl}, '${ep}' (import map), main thread and Web Worker`, { skip }, async (t) => {
      const page = await browser.newPage();
      const logs = [];
      page.on('console', (m) => logs.push(m.text()));
      page.on('pageerror', (e) => logs.push(String(e)));
      await page.goto(`${base}/page.html?impl=${impl}&ep=${ep}&fixtures=1`);
      await page.waitForFunction(() => window.mainThread && window.worker, null, { timeout: 120000 });
      const main = await page.evaluate(() => window.mainThread);
      const worker = await page.evaluate(() => window.worker);
      await page.close();
      for (const [where, r] of [['main thread', main], ['worker', worker]]) {
        const what = `${impl} ${ep} ${where}`;
        assert.ok(!r.failure, `${what}: ${r.failure}\n${logs.join('\n')}`);
        assert.equal(!!r.versions.kiln, impl === 'kiln-web', `${what}: the package the page imported`);
        assert.equal(r.next, 614, what);
        assert.deepEqual(r.dims, [1, 5, 1000]);
        assert.equal(r.error, "input 'input_ids' is missing in 'feeds'.");
        assert.deepEqual(r.more.decode.dims, [1, 1, 1000], `${what}: decode`);
        assert.deepEqual(r.more.decode.present, [1, 2, 6, 16], `${what}: decode`);
        if (ep === 'webgpu') assert.deepEqual(r.device, { isGPUDevice: true, hasQueue: true }, `${what}: env.webgpu.device`);
        assert.ok(Object.keys(r.fixtures).length >= 8, `${what}: fixtures ${Object.keys(r.fixtures)}`);
        let worst = 0;
        for (const [key, f] of Object.entries(r.fixtures)) {
          assert.ok(!f.error, `${what} ${key}: ${f.error}\n${logs.join('\n')}`);
          const off = impl === 'onnxruntime-web' && ORT_OFF[ep].includes(modelOf(key));
          for (const [name, o] of Object.entries(f.outputs)) {
            if (off) t.diagnostic(`${what} ${key} ${name}: max |diff| to the reference ${o.maxDiff.toExponential(2)} (listed in ORT_OFF)`);
            else assert.ok(o.maxDiff <= TOL[impl][ep], `${what} ${key} ${name}: max |diff| to the reference ${o.maxDiff}`);
            if (!off) worst = Math.max(worst, o.maxDiff);
          }
        }
        t.diagnostic(`${what}: ${Object.keys(r.fixtures).length} fixture data sets, max |output - reference| ${worst.toExponential(2)}`);
        // the worker computes what the main thread does
        assert.deepEqual(summary(worker), summary(main), `${impl} ${ep}: worker vs main thread`);
      }
      delete main.versions.kiln;
      runs[`${impl} ${ep}`] = main;
      const ort = runs[`onnxruntime-web ${ep}`];
      const kiln = runs[`kiln-web ${ep}`];
      if (ort && kiln) {
        assert.deepEqual(summary(kiln), summary(ort));
        assert.deepEqual(kiln.versions, ort.versions);
        const tol = 2 * TOL['onnxruntime-web'][ep];
        close(kiln.sample, ort.sample, tol, `${ep} logits`);
        assert.deepEqual(Object.keys(kiln.fixtures), Object.keys(ort.fixtures));
        for (const [key, f] of Object.entries(kiln.fixtures)) {
          if (ORT_OFF[ep].includes(modelOf(key))) continue;
          for (const [name, o] of Object.entries(f.outputs)) {
            const p = ort.fixtures[key].outputs[name];
            assert.deepEqual([o.type, o.dims], [p.type, p.dims], `${ep} ${key} ${name}`);
            close(o.sample, p.sample, tol, `${ep} ${key} ${name} (kiln-web vs onnxruntime-web)`);
          }
        }
      }
    });
  }
}

// kiln-web only, on 'webgpu' (docs/MIGRATING.md): env.webgpu.device, gpu-buffer feeds and outputs, the warning when a
// model asked on 'webgpu' stays on the CPU; then, on a fresh page, onnxruntime-web's powerPreference validation.
test("browser: kiln-web on 'webgpu': env.webgpu, GPU tensors, fallback warnings (test/browser/webgpu-extras.html)", { skip }, async () => {
  for (const query of ['', '?fresh=1']) {
    const page = await browser.newPage();
    const logs = [];
    page.on('console', (m) => logs.push(m.text()));
    page.on('pageerror', (e) => logs.push(String(e)));
    await page.goto(`${base}/test/browser/webgpu-extras.html${query}`);
    await page.waitForFunction(() => window.results, null, { timeout: 60000 });
    const results = await page.evaluate(() => window.results);
    await page.close();
    assert.equal(Object.keys(results).length, query ? 1 : 9, JSON.stringify(results));
    for (const [name, r] of Object.entries(results)) assert.equal(r, 'ok', `${name}: ${r}\n${logs.join('\n')}`);
  }
});

// kiln-web only, on 'webgpu': a model with 64 MiB of weights, in one file and external, streamed from a Blob into GPU buffers, wasm
// memory far below the weights' size, outputs equal to the 'wasm' session's, onProgress over the model and the weights
// on both (test/browser/webgpu-stream.html)
test("browser: kiln-web on 'webgpu' streams weights, inline and external, into GPU buffers (test/browser/webgpu-stream.html)", { skip }, async () => {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  await page.goto(`${base}/test/browser/webgpu-stream.html`);
  await page.waitForFunction(() => window.results, null, { timeout: 300000 });
  const results = await page.evaluate(() => window.results);
  const n = await page.evaluate(() => window.numbers);
  await page.close();
  const mib = (b) => `${(b / 2 ** 20).toFixed(1)} MiB`;
  console.log(
    `kiln-web: streamed ${mib(n.weights)} of external weights on 'webgpu': wasm memory ${mib(n.memoryAtStart)} at start, ` +
      `${mib(n.memoryAfterWebGpu)} after a URL source, ${mib(n.memoryAfterBlob)} after a Blob; ${mib(n.memoryAfterWasm)} ` +
      `after the same model on 'wasm'; max |webgpu - wasm| ${n.maxDiff}; onProgress events ${JSON.stringify(n.progressEvents)}; ` +
      `the model in one file: wasm memory ${mib(n.memoryAfterSingleFile)}, max |webgpu - reference| ${n.singleFileMaxDiff}, ` +
      `largest read of its Blob ${mib(n.largestBlobRead)} (integrity hashed a chunk at a time)`,
  );
  assert.equal(Object.keys(results).length, 3, JSON.stringify(results));
  for (const [name, r] of Object.entries(results)) assert.equal(r, 'ok', `${name}: ${r}\n${logs.join('\n')}`);
});

// kiln-web's tokenizer operators (SmolLM2's and MiniLM's tokenizer.json vs Python tokenizers) and JavaScript custom
// operators, in the browser: the same checks as test/kiln-ops.mjs runs in Node.
test('browser: tokenizer operators and JavaScript custom operators (test/kiln-ops-checks.mjs)', { skip }, async () => {
  const { customOpChecks, tokenizerChecks } = await import('./kiln-ops-checks.mjs');
  const names = Object.keys({ ...customOpChecks, ...tokenizerChecks });
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  page.on('pageerror', (e) => logs.push(String(e)));
  await page.goto(`${base}/test/browser/kiln-ops.html`);
  await page.waitForFunction(() => window.results, null, { timeout: 60000 });
  const results = await page.evaluate(() => window.results);
  await page.close();
  assert.deepEqual(Object.keys(results), names, logs.join('\n'));
  for (const [name, r] of Object.entries(results)) assert.ok(!String(r).startsWith('FAIL'), `${name}: ${r}\n${logs.join('\n')}`);
});

// The parity suite itself (test/parity.mjs, unchanged: test/browser/parity-runner.js) on each package, on 'wasm' and
// 'webgpu', on the main thread and in a module Web Worker; then kiln-web's records compared with onnxruntime-web's
// in the same place like scripts/test.mjs does in Node (KNOWN, plus KNOWN_BROWSER[ep] where onnxruntime-web itself
// behaves differently in a browser). Left out here, and said so in the output:
const PARITY_SKIP = {
  webgpu: {
    // ~120 MB of q4f16 weights: onnxruntime-web's WebGPU EP on SwiftShader (CI has no GPU) takes minutes for it;
    // kiln-web runs it on the wasm path below and natively on the GPU in the Rust tests
    'SmolLM2-135M': 'SmolLM2-135M left out on webgpu in the browser: too slow on SwiftShader for npm test',
    'all-MiniLM-L6-v2': 'all-MiniLM-L6-v2 left out on webgpu in the browser: too slow on SwiftShader for npm test',
  },
  wasm: {},
  // the Web Worker runs leave SmolLM2 to the main-thread run on 'wasm' (the same code; ~20 s more per package)
  worker: { 'SmolLM2-135M': 'SmolLM2-135M runs on the main thread only in the browser (time budget of npm test)' },
};
// Fixtures onnxruntime-web's WebGPU EP itself gets wrong in Chromium (SwiftShader; its checks against onnxruntime's
// CPU references fail: fp16 logits up to 0.86 off, int8 up to 4e7 off, tiny-llama's dynamo export 7.6e-3 off).
// kiln-web must still pass them against the references; their records are not compared with onnxruntime-web's.
const ORT_WEBGPU_OFF = ['tiny-gpt2/onnx_optimum_fp16', 'tiny-gpt2/onnx_optimum_int8', 'tiny-llama/onnx_dynamo_eager_op20', 'tiny-llama/onnx_optimum_fp16', 'tiny-llama/onnx_optimum_int8'];
const parityRuns = {};
async function parityIn(impl, ep, worker) {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => {
    logs.push(m.text());
    if (process.env.KILN_BROWSER_VERBOSE && m.text().startsWith('parity:')) console.log(`${impl} ${ep}: ${m.text()} (${new Date().toISOString()})`);
  });
  page.on('pageerror', (e) => logs.push(String(e)));
  const query = new URLSearchParams({ entry: ENTRIES[impl].replace(/^/, '/repo/js'), ep, skip: JSON.stringify({ ...PARITY_SKIP[ep], ...(worker ? PARITY_SKIP.worker : {}) }), worker: worker ? '1' : '0' });
  await page.goto(`${base}/repo/js/test/browser/parity.html?${query}`);
  await page.waitForFunction(() => window.result, null, { timeout: 600000 });
  const r = await page.evaluate(() => window.result);
  await page.close();
  return { ...r, logs };
}
for (const ep of ['wasm', 'webgpu']) {
  for (const where of ['main thread', 'Web Worker']) {
    test(`browser: the parity suite (test/parity.mjs) on '${ep}', ${where}: onnxruntime-web vs kiln-web`, { skip }, async (t) => {
      const records = {};
      // both packages at once (each runs single-threaded; CI has 2 cores)
      const impls = ['onnxruntime-web', 'kiln-web'];
      const runsOf = await Promise.all(impls.map((impl) => parityIn(impl, ep, where === 'Web Worker')));
      for (const [i, impl] of impls.entries()) {
        const r = runsOf[i];
        assert.ok(!r.failure, `${impl} ${ep} ${where}: ${r.failure}\n${r.logs.join('\n')}`);
        const off = (name) => impl === 'onnxruntime-web' && ep === 'webgpu' && ORT_WEBGPU_OFF.some((f) => name === `fixture ${f}: metadata, prefill and decode against test_data_set_*`);
        for (const x of r.results.filter((y) => y.status === 'fail' && off(y.name))) t.diagnostic(`KNOWN onnxruntime-web 'webgpu' off the reference (ORT_WEBGPU_OFF): ${x.error.split('\n')[0].slice(0, 160)}`);
        const failed = r.results.filter((x) => x.status === 'fail' && !off(x.name));
        const skipped = r.results.filter((x) => x.status === 'skip');
        const slowest = r.results.filter((x) => x.ms > 2000).map((x) => `${x.name.slice(0, 40)} ${(x.ms / 1000).toFixed(1)} s`);
        if (slowest.length) t.diagnostic(`${impl}: slowest: ${slowest.join(', ')}`);
        for (const x of skipped) t.diagnostic(`${impl}: skipped '${x.name}': ${x.reason}`);
        t.diagnostic(`${impl}: ${r.results.length - failed.length - skipped.length} of ${r.results.length} tests passed, ${skipped.length} skipped, ${Object.keys(r.out?.records ?? {}).length} records (${(r.ms / 1000).toFixed(1)} s)`);
        assert.equal(failed.length, 0, `${impl} ${ep} ${where}:\n${failed.map((x) => `${x.name}: ${x.error}`).join('\n')}\n${r.logs.slice(-20).join('\n')}`);
        assert.ok(r.out, `${impl}: no records written`);
        records[impl] = r.out.records;
        // KILN_BROWSER_RECORDS=dir: each run's records as JSON, for a look at what was compared
        if (process.env.KILN_BROWSER_RECORDS) {
          fs.writeFileSync(path.join(process.env.KILN_BROWSER_RECORDS, `${impl} ${ep} ${where}.json`), JSON.stringify(r.out.records, null, 1));
        }
      }
      if (ep === 'webgpu') {
        for (const impl of Object.keys(records)) {
          records[impl] = Object.fromEntries(Object.entries(records[impl]).filter(([k]) => !ORT_WEBGPU_OFF.includes(k.split(' ')[0])));
        }
      }
      const { same, lines, failed } = compareRecords(records['onnxruntime-web'], records['kiln-web'], { ...KNOWN, ...KNOWN_BROWSER[ep] });
      for (const line of lines) t.diagnostic(line);
      t.diagnostic(`${same} records the same on both ('${ep}', ${where})`);
      parityRuns[`${ep} ${where}`] = records['kiln-web'];
      assert.ok(!failed, lines.filter((l) => l.startsWith('DIFF')).join('\n'));
    });
  }
}
