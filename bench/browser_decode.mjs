// SmolLM2-135M q4f16 greedy decoding in headless Chromium (Debian's chromium, playwright-core, the SwiftShader
// WebGPU adapter): kiln-web on 'webgpu' (KV cache kept on the GPU: present.* as 'gpu-buffer' outputs fed back) and
// on 'wasm', against onnxruntime-web 1.30 on 'wasm' and 'webgpu', the same page and API for all four.
//
//   node bench/browser_decode.mjs [--steps 8] [--ids 6403,1980,...] [--runs kiln:webgpu,kiln:wasm,ort:wasm,ort:webgpu]
//                                 [--extra '{"kiln":{"f16FusedAttention":true}}']   (session options' `extra`)
//
// Needs js/ built (`cd js && npm ci && npm run build`). Prints one JSON line per run: prefill ms, decode ms/token
// (mean and median over the steps), the tokens (and kiln-web's wasm memory in MiB), or the error the engine gave.
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const here = path.dirname(fileURLToPath(import.meta.url));
const js = process.env.KILN_JS ?? path.resolve(here, '../js');
const require = createRequire(path.join(js, 'package.json'));
const { chromium } = require('playwright-core');

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const steps = Number(arg('steps', '8'));
const ids = arg('ids', '6403,1980,253,655,28,339,436,253,3241,282,253,9835,259,30,339,436').split(',').map(Number);
const runs = arg('runs', 'kiln:webgpu,ort:wasm,kiln:wasm,ort:webgpu').split(',');
const extra = JSON.parse(arg('extra', '{}'));
const models = path.resolve(here, '../../shared/models');
const modelUrl = '/shared/models/smollm2-135m-instruct/onnx/model_q4f16.onnx';

const ENTRIES = { kiln: '/js/lib/browser.js', ort: '/js/node_modules/onnxruntime-web/dist/ort.bundle.min.mjs' };
const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };

// the page: greedy decoding through the onnxruntime-web API only
const page = (engine, ep) => `<!doctype html><meta charset="utf-8"><script type="module">
import * as ort from '${ENTRIES[engine]}';
const ids = ${JSON.stringify(ids)};
const steps = ${steps};
const gpuKv = ${JSON.stringify(engine === 'kiln' && ep === 'webgpu')};
try {
  ort.env.wasm.numThreads = 1;
  const t0 = performance.now();
  const session = await ort.InferenceSession.create('${modelUrl}', {
    executionProviders: ['${ep}'],
    extra: ${JSON.stringify(extra)},
    ...(gpuKv ? { preferredOutputLocation: Object.fromEntries(
      Array.from({ length: 30 }, (_, i) => [['present.' + i + '.key', 'gpu-buffer'], ['present.' + i + '.value', 'gpu-buffer']]).flat()) } : {}),
  });
  const loadMs = performance.now() - t0;
  const pastNames = session.inputNames.filter((n) => n.startsWith('past_key_values.'));
  let past = Object.fromEntries(pastNames.map((n) => [n, new ort.Tensor('float16', new Uint16Array(0), [1, 3, 0, 64])]));
  const i64 = (v) => new ort.Tensor('int64', BigInt64Array.from(v.map(BigInt)), [1, v.length]);
  const tokens = [];
  const times = [];
  let seen = 0;
  let input = ids;
  for (let step = 0; step <= steps; step++) {
    const t = performance.now();
    const total = seen + input.length;
    const feeds = { input_ids: i64(input), attention_mask: i64(Array(total).fill(1)),
      position_ids: i64(Array.from({ length: input.length }, (_, i) => seen + i)), ...past };
    const out = await session.run(feeds);
    const logits = out.logits;
    const vocab = logits.dims[2];
    const data = logits.data;
    const off = (logits.dims[1] - 1) * vocab;
    let best = 0;
    for (let v = 1; v < vocab; v++) if (data[off + v] > data[off + best]) best = v;
    const next = {};
    for (const n of pastNames) next[n] = out[n.replace('past_key_values.', 'present.')];
    if (gpuKv && step > 0) for (const n of pastNames) past[n].dispose();
    past = next;
    times.push(performance.now() - t);
    tokens.push(best);
    seen = total;
    input = [best];
  }
  const decode = times.slice(1);
  const sorted = [...decode].sort((a, b) => a - b);
  // kiln-web: its wasm memory after the run (MiB)
  const wasmMiB = typeof ort.kilnWasmMemoryBytes === 'function' ? (await ort.kilnWasmMemoryBytes()) / 2 ** 20 : undefined;
  window.result = { loadMs, prefillMs: times[0], decodeMean: decode.reduce((a, b) => a + b, 0) / decode.length,
    decodeMedian: sorted[Math.floor(sorted.length / 2)], tokens, wasmMiB };
} catch (e) {
  window.result = { error: String(e && e.message || e) };
}
</script>`;

const server = http.createServer((req, res) => {
  const url = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  if (url.startsWith('/page/')) {
    const [, , engine, ep] = url.split('/');
    res.writeHead(200, { 'content-type': 'text/html' });
    return res.end(page(engine, ep));
  }
  const file = url.startsWith('/shared/models/') ? path.join(models, url.slice('/shared/models/'.length)) : url.startsWith('/js/') ? path.join(js, url.slice(4)) : null;
  if (!file || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    res.writeHead(404);
    return res.end();
  }
  res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const port = server.address().port;
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-bench-'));
const browser = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--enable-unsafe-webgpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--disable-quic', '--no-first-run'],
});
try {
  for (const run of runs) {
    const [engine, ep] = run.split(':');
    const p = await browser.newPage();
    await p.goto(`http://127.0.0.1:${port}/page/${engine}/${ep}`);
    await p.waitForFunction(() => window.result !== undefined, null, { timeout: 30 * 60 * 1000, polling: 500 });
    const result = await p.evaluate(() => window.result);
    console.log(JSON.stringify({ engine, ep, steps, ...result }));
    await p.close();
  }
} finally {
  await browser.close();
  server.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
