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

const js = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const fixtures = path.resolve(js, '../conformance/fixtures/tiny');
const tokData = path.resolve(js, '../ops/tests/data/tokenizer');
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const skip = !fs.existsSync(executablePath) && `no chromium at ${executablePath}`;

const ENTRIES = {
  'kiln-web': '/lib/browser.js',
  'onnxruntime-web': '/node_modules/onnxruntime-web/dist/ort.bundle.min.mjs',
};
const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html', '.json': 'application/json' };

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
  browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
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

const results = {};
for (const impl of ['onnxruntime-web', 'kiln-web']) {
  test(`browser: the onnxruntime-web app on ${impl} (import map), main thread and Web Worker`, { skip }, async () => {
    const page = await browser.newPage();
    const logs = [];
    page.on('console', (m) => logs.push(m.text()));
    page.on('pageerror', (e) => logs.push(String(e)));
    await page.goto(`${base}/page.html?impl=${impl}`);
    await page.waitForFunction(() => window.mainThread && window.worker, null, { timeout: 60000 });
    const main = await page.evaluate(() => window.mainThread);
    const worker = await page.evaluate(() => window.worker);
    await page.close();
    for (const [where, r] of [['main thread', main], ['worker', worker]]) {
      assert.ok(!r.failure, `${impl} ${where}: ${r.failure}\n${logs.join('\n')}`);
      assert.equal(r.next, 614, `${impl} ${where}`);
      assert.deepEqual(r.dims, [1, 5, 1000]);
      assert.equal(r.error, "input 'input_ids' is missing in 'feeds'.");
    }
    delete main.versions.kiln;
    results[impl] = main;
    if (results['onnxruntime-web'] && results['kiln-web']) assert.deepEqual(results['kiln-web'], results['onnxruntime-web']);
  });
}

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
