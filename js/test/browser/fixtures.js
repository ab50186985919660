// The tiny fixtures (conformance/fixtures/tiny: ONNX backend-test data sets, outputs computed by onnxruntime) run
// through the onnxruntime-web API in a page or worker, on one execution provider. Works on any package with that API
// (kiln-web or onnxruntime-web), so the Node side can compare the two.

const TYPES = { 1: 'float32', 2: 'uint8', 3: 'int8', 4: 'uint16', 5: 'int16', 6: 'int32', 7: 'int64', 9: 'bool', 10: 'float16', 11: 'float64', 12: 'uint32', 13: 'uint64' };
const ARRAYS = { float32: Float32Array, uint8: Uint8Array, int8: Int8Array, uint16: Uint16Array, int16: Int16Array, int32: Int32Array, int64: BigInt64Array, bool: Uint8Array, float16: Uint16Array, float64: Float64Array, uint32: Uint32Array, uint64: BigUint64Array };

/** An ONNX TensorProto (the bytes of input_N.pb / output_N.pb) → { name, type, dims, data }. */
export function readTensorProto(bytes) {
  const buf = new Uint8Array(bytes);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let pos = 0;
  const varint = () => {
    let v = 0n;
    let shift = 0n;
    for (;;) {
      const b = buf[pos++];
      v |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
      shift += 7n;
    }
  };
  const t = { dims: [], name: '', dataType: 0, raw: null, ints: [], floats: [], doubles: [] };
  while (pos < buf.length) {
    const key = Number(varint());
    const field = key >> 3;
    const wire = key & 7;
    if (wire === 2) {
      const len = Number(varint());
      const end = pos + len;
      if (field === 1) while (pos < end) t.dims.push(Number(BigInt.asIntN(64, varint())));
      else if (field === 5 || field === 7) while (pos < end) t.ints.push(BigInt.asIntN(64, varint()));
      else if (field === 4) for (; pos < end; pos += 4) t.floats.push(view.getFloat32(pos, true));
      else if (field === 10) for (; pos < end; pos += 8) t.doubles.push(view.getFloat64(pos, true));
      else if (field === 8) t.name = new TextDecoder().decode(buf.subarray(pos, end));
      else if (field === 9) t.raw = buf.slice(pos, end);
      pos = end;
    } else if (wire === 0) {
      const v = varint();
      if (field === 1) t.dims.push(Number(v));
      else if (field === 2) t.dataType = Number(v);
      else if (field === 5 || field === 7) t.ints.push(BigInt.asIntN(64, v));
    } else if (wire === 5) {
      if (field === 4) t.floats.push(view.getFloat32(pos, true));
      pos += 4;
    } else if (wire === 1) {
      if (field === 10) t.doubles.push(view.getFloat64(pos, true));
      pos += 8;
    } else throw new Error(`unexpected wire type ${wire}`);
  }
  const type = TYPES[t.dataType];
  if (!type) throw new Error(`unsupported data type ${t.dataType}`);
  const A = ARRAYS[type];
  let data;
  if (t.raw) data = new A(t.raw.buffer, 0, t.raw.length / A.BYTES_PER_ELEMENT);
  else if (type === 'float32') data = Float32Array.from(t.floats);
  else if (type === 'float64') data = Float64Array.from(t.doubles);
  else if (type === 'int64' || type === 'uint64') data = A.from(t.ints);
  else data = A.from(t.ints.map(Number));
  return { name: t.name, type, dims: t.dims, data };
}

function f16(h) {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
const numbers = (type, data) => (type === 'float16' ? Array.from(data, f16) : Array.from(data, Number));

// f32 fixtures: onnxruntime-web's WebGPU EP runs them too (the fp16 / int8 exports are left to the wasm path)
export const FIXTURES = ['tiny-gpt2/onnx_optimum', 'tiny-llama/onnx_optimum', 'tiny-gpt2/onnx_dynamo_eager_op20', 'tiny-llama/onnx_dynamo_eager_op20'];

/**
 * Runs each fixture's data sets on `ep` and compares every output with the reference. Returns
 * { 'model set': { outputs: { name: { dims, maxDiff, sample } } } | { error } }.
 */
export async function fixtureChecks(ort, ep, base = '/fixtures/') {
  const get = async (p) => {
    const r = await fetch(base + p);
    return r.ok ? new Uint8Array(await r.arrayBuffer()) : null;
  };
  const results = {};
  for (const model of FIXTURES) {
    let session;
    try {
      session = await ort.InferenceSession.create(base + model + '/model.onnx', { executionProviders: [ep] });
    } catch (e) {
      results[model] = { error: String(e && e.message) };
      continue;
    }
    for (const set of ['test_data_set_0', 'test_data_set_1']) {
      const key = `${model} ${set}`;
      try {
        const inputs = [];
        const outputs = [];
        for (let j = 0; ; j++) {
          const b = await get(`${model}/${set}/input_${j}.pb`);
          if (!b) break;
          inputs.push(readTensorProto(b));
        }
        for (let j = 0; ; j++) {
          const b = await get(`${model}/${set}/output_${j}.pb`);
          if (!b) break;
          outputs.push(readTensorProto(b));
        }
        if (!inputs.length) continue;
        const feeds = {};
        inputs.forEach((t, i) => (feeds[t.name || session.inputNames[i]] = new ort.Tensor(t.type, t.data, t.dims)));
        const got = await session.run(feeds);
        const r = {};
        outputs.forEach((want, i) => {
          const name = want.name || session.outputNames[i];
          const g = got[name];
          const a = numbers(g.type, g.data);
          const w = numbers(want.type, want.data);
          let maxDiff = a.length === w.length ? 0 : Infinity;
          for (let k = 0; k < a.length && k < w.length; k++) {
            const d = Math.abs(a[k] - w[k]);
            maxDiff = Number.isNaN(d) ? Infinity : Math.max(maxDiff, d);
          }
          const step = Math.max(1, Math.floor(a.length / 64));
          r[name] = { type: g.type, dims: Array.from(g.dims), maxDiff, sample: a.filter((_, k) => k % step === 0).slice(0, 64) };
        });
        results[key] = { outputs: r };
      } catch (e) {
        results[key] = { error: String(e && e.message) };
      }
    }
    await session.release();
  }
  return results;
}
