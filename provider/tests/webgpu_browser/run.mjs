// Serves www/ (the page), pkg/ (the wasm-bindgen output of this crate) and the tiny fixtures, opens the page in
// headless Chromium with WebGPU on (SwiftShader when there is no GPU), and checks each fixture line: the session is
// on kiln's WebGPU provider, most nodes on the GPU, one submit per run, outputs within 1e-4 of the reference.
// CHROMIUM=/path/to/chromium overrides /usr/bin/chromium.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../../..');
const { chromium } = await import(path.join(root, 'js/node_modules/playwright-core/index.mjs'));
const TYPES = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };
const mounts = [
  ['/pkg/', path.join(here, 'pkg')],
  ['/fixtures/', path.join(root, 'conformance/fixtures/tiny')],
  ['/', path.join(here, 'www')],
];
const server = http.createServer((q, r) => {
  const p = decodeURIComponent(new URL(q.url, 'http://x').pathname);
  const [prefix, dir] = mounts.find(([m]) => p.startsWith(m));
  const f = path.join(dir, p.slice(prefix.length));
  if (!f.startsWith(dir)) return r.writeHead(403).end();
  fs.readFile(f, (err, d) =>
    err ? r.writeHead(404).end() : r.writeHead(200, { 'Content-Type': TYPES[path.extname(f)] ?? 'application/octet-stream' }).end(d),
  );
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--enable-unsafe-webgpu'],
  headless: true,
});
let failed = false;
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.log('pageerror:', e.message));
  await page.goto(`http://127.0.0.1:${server.address().port}/fixtures.html`);
  const hasGpu = await page.evaluate(async () => !!(navigator.gpu && (await navigator.gpu.requestAdapter())));
  if (!hasGpu) throw new Error('this Chromium offers no WebGPU adapter');
  const result = await page.evaluate(() => window.result);
  console.log(result);
  const lines = result.split('\n').filter(Boolean);
  if (!lines.length) failed = true;
  for (const l of lines) {
    const m = /(\d+) of (\d+) nodes on the GPU; (\d+) runs, (\d+) submits; max\|gpu-ref\| (\S+)/.exec(l);
    const ok = m && +m[1] > +m[2] / 2 && +m[4] <= +m[3] && +m[5] <= 1e-4;
    if (!ok) {
      console.error(`FAILED: ${l}`);
      failed = true;
    }
  }
} finally {
  await browser.close();
  server.close();
}
console.log(failed ? 'webgpu browser check: FAILED' : 'webgpu browser check: ok');
process.exit(failed ? 1 : 0);
