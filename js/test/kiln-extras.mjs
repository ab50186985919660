// kiln-web's additions to onnxruntime-web's API (run on kiln-web only): InferenceSession.create(url | path,
// { onProgress }) and { integrity: 'sha256-...' } (Subresource Integrity format); and what happens when kiln traps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'kiln-web';

const MODEL = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx');
const bytes = fs.readFileSync(MODEL);
const sri = (alg) => `${alg}-${crypto.createHash(alg).update(bytes).digest('base64')}`;

test('integrity: a matching hash loads, another is rejected, an unknown format is a TypeError', async () => {
  for (const alg of ['sha256', 'sha384', 'sha512']) {
    const s = await ort.InferenceSession.create(new Uint8Array(bytes), { integrity: sri(alg) });
    assert.equal(s.inputNames[0], 'input_ids');
    await s.release();
  }
  // several hashes: one matching is enough
  await (await ort.InferenceSession.create(MODEL, { integrity: `sha256-AAAA ${sri('sha512')}` })).release();
  const other = `sha256-${crypto.createHash('sha256').update('other').digest('base64')}`;
  await assert.rejects(ort.InferenceSession.create(new Uint8Array(bytes), { integrity: other }), /does not match its integrity value: expected sha256-/);
  await assert.rejects(ort.InferenceSession.create(MODEL, { integrity: 'md5-abc' }), TypeError);
});

test('onProgress: a model URL streams with progress; a path reports once', async () => {
  // a server that sends the model in 4 KiB chunks, with and without Content-Length
  const server = http.createServer((req, res) => {
    const chunked = req.url.includes('chunked');
    if (req.url.includes('missing')) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, chunked ? {} : { 'Content-Length': bytes.length });
    let pos = 0;
    const next = () => {
      if (pos >= bytes.length) return res.end();
      res.write(bytes.subarray(pos, pos + 4096), next);
      pos += 4096;
    };
    next();
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${server.address().port}`;
  try {
    for (const [url, total] of [[`${base}/model.onnx`, bytes.length], [`${base}/chunked/model.onnx`, 0]]) {
      const events = [];
      const s = await ort.InferenceSession.create(url, { onProgress: (p) => events.push(p), integrity: sri('sha256') });
      assert.ok(events.length > 1, `${events.length} progress events`);
      assert.deepEqual(events.at(-1), { loaded: bytes.length, total });
      assert.ok(events.every((e, i) => i === 0 || e.loaded > events[i - 1].loaded));
      const out = await s.run(
        Object.fromEntries(
          s.inputNames.map((n) => [
            n,
            n.startsWith('past') ? new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]) : new ort.Tensor('int64', new BigInt64Array([1n]), [1, 1]),
          ]),
        ),
      );
      assert.deepEqual(Array.from(out.logits.dims), [1, 1, 1000]);
      await s.release();
    }
    await assert.rejects(ort.InferenceSession.create(`${base}/missing.onnx`), /failed to load model: .*missing\.onnx \(HTTP 404\)/);
  } finally {
    server.close();
  }
  const events = [];
  await (await ort.InferenceSession.create(MODEL, { onProgress: (p) => events.push(p) })).release();
  assert.deepEqual(events, [{ loaded: bytes.length, total: bytes.length }]);
});

// tiny-llama fed a token id past its 1000-token vocabulary: onnxruntime reports an error; tract's Gather panics, which
// in wasm is a trap. The run must reject with an Error, and the module must stay usable for new sessions.
test('a wasm trap is an Error, and new sessions work afterwards', async () => {
  const feeds = (s, id) => {
    const f = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from([id]), [1, 1]),
      attention_mask: new ort.Tensor('int64', BigInt64Array.from([1n]), [1, 1]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from([0n]), [1, 1]),
    };
    for (const n of s.inputNames.filter((n) => n.startsWith('past'))) f[n] = new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]);
    return f;
  };
  const other = await ort.InferenceSession.create(MODEL);
  const s = await ort.InferenceSession.create(MODEL);
  const e = await s.run(feeds(s, 99999n)).then(() => null, (e) => e);
  assert.ok(e instanceof Error && e.constructor === Error, `${e}`);
  assert.match(e.message, /^failed to call OrtRun\(\)\. ERROR_CODE: \d+, ERROR_MESSAGE: /);
  if (/wasm trap/.test(e.message)) {
    // that instance is gone: its sessions say so, new sessions get a fresh instance
    await assert.rejects(s.run(feeds(s, 1n)), /create it again|create the session again/);
    await assert.rejects(other.run(feeds(other, 1n)), /create the session again/);
  }
  const fresh = await ort.InferenceSession.create(MODEL);
  assert.deepEqual(Array.from((await fresh.run(feeds(fresh, 1n))).logits.dims), [1, 1, 1000]);
  await fresh.release();
  await s.release();
  await other.release();
});
