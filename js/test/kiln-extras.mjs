// kiln-web's additions to onnxruntime-web's API (run on kiln-web only): InferenceSession.create(url | path,
// { onProgress }) (the model and its external data as one progress) and { integrity: 'sha256-...' } (Subresource
// Integrity format); and what happens when kiln traps.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'kiln-web';

const FIXTURE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../conformance/fixtures/tiny/tiny-llama/onnx_optimum');
const MODEL = path.join(FIXTURE, 'model.onnx');
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

/** A local HTTP server sending `files` (path → bytes) in `chunk`-byte writes; `/chunked/<path>` without Content-Length,
 * any other path 404. */
async function serveInChunks(files, chunk) {
  const server = http.createServer((req, res) => {
    const chunked = req.url.startsWith('/chunked/');
    const data = files[chunked ? req.url.slice('/chunked'.length) : req.url];
    if (!data) return res.writeHead(404).end();
    res.writeHead(200, chunked ? {} : { 'Content-Length': data.length });
    let pos = 0;
    const next = () => {
      if (pos >= data.length) return res.end();
      res.write(data.subarray(pos, pos + chunk), next);
      pos += chunk;
    };
    next();
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { server, base: `http://127.0.0.1:${server.address().port}` };
}

test('onProgress: a model URL streams with progress; a path reports once', async () => {
  // a server that sends the model in 4 KiB chunks, with and without Content-Length
  const { server, base } = await serveInChunks({ '/model.onnx': bytes }, 4096);
  try {
    for (const [url, total] of [[`${base}/model.onnx`, bytes.length], [`${base}/chunked/model.onnx`, 0]]) {
      const events = [];
      const s = await ort.InferenceSession.create(url, { onProgress: (p) => events.push(p), integrity: sri('sha256') });
      assert.ok(events.length > 1, `${events.length} progress events`);
      // total: Content-Length from the start; without it 0 until the download has ended, then the size
      assert.ok(events.slice(0, -1).every((e) => e.total === total));
      assert.deepEqual(events.at(-1), { loaded: bytes.length, total: bytes.length });
      assert.ok(events.every((e, i) => i === 0 || e.loaded >= events[i - 1].loaded));
      assert.ok(events.every((e, i) => i === 0 || e.loaded > events[i - 1].loaded || e.total !== events[i - 1].total));
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

// ---- a model with external data: tiny-llama with its initializers moved out of model.onnx ---------------------------
// protobuf, as much as needed: a message's fields as { field, wire, start (of the key), body (a length-delimited
// field's bytes), end }
function fieldsOf(buf) {
  const out = [];
  let pos = 0;
  const varint = () => {
    let v = 0;
    let mul = 1;
    for (;;) {
      const b = buf[pos++];
      v += (b & 0x7f) * mul;
      if (!(b & 0x80)) return v;
      mul *= 128;
    }
  };
  while (pos < buf.length) {
    const start = pos;
    const key = varint();
    const f = { field: Math.floor(key / 8), wire: key & 7, start };
    if (f.wire === 0) f.value = varint();
    else if (f.wire === 2) {
      const len = varint();
      f.body = buf.subarray(pos, pos + len);
      pos += len;
    } else if (f.wire === 5) pos += 4;
    else if (f.wire === 1) pos += 8;
    else throw new Error(`wire type ${f.wire}`);
    f.end = pos;
    out.push(f);
  }
  return out;
}
const varintBytes = (n) => {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
};
const lengthDelimited = (field, body) => Buffer.concat([varintBytes(field * 8 + 2), varintBytes(body.length), body]);

/**
 * The model with every initializer's raw_data moved to external files, the initializers dealt to `files` in turn
 * (each at a 64-byte aligned offset). Returns { model, files: { name: Buffer } }.
 */
function externalize(modelBytes, files) {
  const data = Object.fromEntries(files.map((f) => [f, []]));
  const sizes = Object.fromEntries(files.map((f) => [f, 0]));
  let next = 0;
  const rewrite = (buf, onField) => Buffer.concat(fieldsOf(buf).map((f) => onField(f) ?? buf.subarray(f.start, f.end)));
  const tensor = (buf) => {
    const fields = fieldsOf(buf);
    const raw = fields.find((f) => f.field === 9 && f.wire === 2);
    if (!raw) return buf;
    const file = files[next++ % files.length];
    const offset = Math.ceil(sizes[file] / 64) * 64;
    data[file].push(Buffer.alloc(offset - sizes[file]), raw.body);
    sizes[file] = offset + raw.body.length;
    const entry = (k, v) => lengthDelimited(13, Buffer.concat([lengthDelimited(1, Buffer.from(k)), lengthDelimited(2, Buffer.from(v))]));
    return Buffer.concat([
      ...fields.filter((f) => f !== raw).map((f) => buf.subarray(f.start, f.end)),
      entry('location', file),
      entry('offset', String(offset)),
      entry('length', String(raw.body.length)),
      Buffer.from([14 * 8, 1]), // data_location: EXTERNAL
    ]);
  };
  const graph = (buf) => rewrite(buf, (f) => (f.field === 5 && f.wire === 2 ? lengthDelimited(5, tensor(f.body)) : undefined));
  const model = rewrite(modelBytes, (f) => (f.field === 7 && f.wire === 2 ? lengthDelimited(7, graph(f.body)) : undefined));
  return { model, files: Object.fromEntries(files.map((f) => [f, Buffer.concat(data[f])])) };
}

// test_data_set_*/*.pb (TensorProto with raw_data, as onnx's numpy_helper writes them) → { name, tensor }
function readTensorProto(file) {
  const t = { dims: [] };
  for (const f of fieldsOf(fs.readFileSync(file))) {
    if (f.field === 1 && f.wire === 0) t.dims.push(f.value);
    else if (f.field === 1 && f.wire === 2) t.dims.push(...fieldsOf(Buffer.concat([Buffer.from([8]), f.body])).map((g) => g.value));
    else if (f.field === 2) t.type = { 1: 'float32', 7: 'int64' }[f.value];
    else if (f.field === 8) t.name = f.body.toString('utf8');
    else if (f.field === 9) t.raw = Buffer.from(f.body);
  }
  assert.ok(t.type && t.raw, `${file}: a float32 or int64 tensor with raw_data`);
  const Array_ = t.type === 'float32' ? Float32Array : BigInt64Array;
  const data = new Array_(t.raw.buffer, t.raw.byteOffset, t.raw.length / Array_.BYTES_PER_ELEMENT);
  return { name: t.name, tensor: new ort.Tensor(t.type, data.slice(), t.dims) };
}

// the session against onnxruntime's outputs in the fixture's test_data_set_* (the parity suite's tolerance)
async function checkAgainstReference(s, what) {
  const sets = fs.readdirSync(FIXTURE).filter((d) => d.startsWith('test_data_set_'));
  assert.ok(sets.length > 0);
  for (const set of sets) {
    const read = (prefix) =>
      fs
        .readdirSync(path.join(FIXTURE, set))
        .filter((f) => f.startsWith(prefix))
        .map((f) => readTensorProto(path.join(FIXTURE, set, f)));
    const out = await s.run(Object.fromEntries(read('input_').map((t) => [t.name, t.tensor])));
    const expected = read('output_');
    assert.ok(expected.length > 0);
    for (const { name, tensor } of expected) {
      const got = out[name];
      assert.deepEqual(Array.from(got.dims), Array.from(tensor.dims), `${what} ${set} ${name}`);
      let worst = 0;
      for (let i = 0; i < tensor.data.length; i++) {
        worst = Math.max(worst, Math.abs(got.data[i] - tensor.data[i]) - 1e-3 * Math.abs(tensor.data[i]));
      }
      assert.ok(worst <= 1e-4, `${what} ${set} ${name}: |kiln - onnxruntime| exceeds 1e-4 + 1e-3 |ref| by ${worst}`);
    }
  }
}

// progress events: loaded never decreases, the last has loaded === total === the sum of every source's bytes
function checkProgress(events, expected, what) {
  assert.ok(events.length > 0, `${what}: no progress events`);
  for (const [i, e] of events.entries()) {
    assert.deepEqual(Object.keys(e).sort(), ['loaded', 'total'], what);
    assert.ok(Number.isInteger(e.loaded) && Number.isInteger(e.total) && e.loaded >= 0 && e.total >= 0, `${what}: ${JSON.stringify(e)}`);
    if (i > 0) assert.ok(e.loaded >= events[i - 1].loaded, `${what}: loaded went down at event ${i}: ${JSON.stringify(events.slice(i - 1, i + 1))}`);
    if (i > 0) assert.notDeepEqual(e, events[i - 1], `${what}: event ${i} repeats the one before`);
  }
  assert.deepEqual(events.at(-1), { loaded: expected, total: expected }, `${what}: the last event`);
}

test('onProgress: the model and its external data (URLs, with and without Content-Length; bytes, Blobs, paths) as one progress', async (t) => {
  const ext = externalize(bytes, ['weights-a.bin', 'weights-b.bin']);
  const [a, b] = [ext.files['weights-a.bin'], ext.files['weights-b.bin']];
  assert.ok(a.length > 100_000 && b.length > 100_000 && ext.model.length < bytes.length - a.length - b.length / 2, 'the weights left model.onnx');
  // the model itself: no weights, so it cannot load without its external data
  await assert.rejects(ort.InferenceSession.create(new Uint8Array(ext.model)), /weights-[ab]\.bin/);
  // a server sending each file in 8 KiB writes; /chunked/ without Content-Length
  const { server, base } = await serveInChunks({ '/model.onnx': ext.model, '/weights-a.bin': a, '/weights-b.bin': b }, 8192);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-extras-'));
  try {
    const all = ext.model.length + a.length + b.length;
    const cases = {
      'model and external data as URLs (weights-b.bin without Content-Length)': [
        `${base}/model.onnx`,
        [{ path: 'weights-a.bin', data: `${base}/weights-a.bin` }, { path: 'weights-b.bin', data: `${base}/chunked/weights-b.bin` }],
      ],
      'model URL without Content-Length, external data as URLs': [
        `${base}/chunked/model.onnx`,
        [{ path: 'weights-a.bin', data: `${base}/weights-a.bin` }, { path: './weights-b.bin', data: `${base}/weights-b.bin` }],
      ],
      'model bytes, external data as a URL and a Blob': [
        new Uint8Array(ext.model),
        [{ path: 'weights-a.bin', data: `${base}/weights-a.bin` }, { path: 'weights-b.bin', data: new Blob([b]) }],
      ],
      'model path, external data as a path and an ArrayBuffer': [
        path.join(tmp, 'model.onnx'),
        [{ path: 'weights-a.bin', data: path.join(tmp, 'weights-a.bin') }, { path: 'weights-b.bin', data: new Uint8Array(b).buffer }],
      ],
    };
    for (const [name, data] of Object.entries({ 'model.onnx': ext.model, 'weights-a.bin': a, 'weights-b.bin': b })) fs.writeFileSync(path.join(tmp, name), data);
    for (const [what, [model, externalData]] of Object.entries(cases)) {
      const events = [];
      const s = await ort.InferenceSession.create(model, { externalData, onProgress: (p) => events.push({ ...p }) });
      await checkAgainstReference(s, what);
      await s.release();
      checkProgress(events, all, what);
      // the external files' bytes are reported as they arrive, not only the model's
      const downloads = externalData.filter((e) => typeof e.data === 'string' && e.data.startsWith('http')).length;
      if (downloads > 0) {
        const during = events.filter((e) => e.loaded > all - a.length - b.length && e.loaded < all);
        assert.ok(during.length >= 4, `${what}: ${during.length} events while the external data downloads`);
      }
      t.diagnostic(`${what}: ${events.length} progress events, last ${JSON.stringify(events.at(-1))}`);
    }
    // the model and its external data in memory: nothing is loaded, nothing reported (as for a model given as bytes)
    const events = [];
    const s = await ort.InferenceSession.create(new Uint8Array(ext.model), {
      externalData: [{ path: 'weights-a.bin', data: new Uint8Array(a) }, { path: 'weights-b.bin', data: new Blob([b]) }],
      onProgress: (p) => events.push(p),
    });
    await checkAgainstReference(s, 'in memory');
    await s.release();
    assert.deepEqual(events, []);
    // a missing external file: the download's error
    await assert.rejects(
      ort.InferenceSession.create(`${base}/model.onnx`, { externalData: [{ path: 'weights-a.bin', data: `${base}/missing.bin` }], onProgress() {} }),
      /failed to load external data file: .*missing\.bin \(HTTP 404\)/,
    );
  } finally {
    server.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
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
