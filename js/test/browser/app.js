// An app written for onnxruntime-web (it only knows the `ort` namespace it is given): tiny-llama's greedy next token
// after 11, 22, 33, 44, 55 (onnxruntime: 614), metadata, argument-validation and engine errors, fetches and a
// decode step with the KV cache.
// `ep`: the execution provider asked for ('wasm' or 'webgpu'); on 'webgpu' the result also says whether
// env.webgpu.device then resolves to a GPUDevice (the device the session runs on).
export async function app(ort, modelUrl, ep = 'wasm') {
  ort.env.wasm.numThreads = 1;
  const session = await ort.InferenceSession.create(modelUrl, { executionProviders: [ep] });
  const ids = [11n, 22n, 33n, 44n, 55n];
  const feeds = {
    input_ids: new ort.Tensor('int64', BigInt64Array.from(ids), [1, 5]),
    attention_mask: new ort.Tensor('int64', new BigInt64Array(5).fill(1n), [1, 5]),
    position_ids: new ort.Tensor('int64', BigInt64Array.from([0n, 1n, 2n, 3n, 4n]), [1, 5]),
  };
  for (const name of session.inputNames.filter((n) => n.startsWith('past_key_values'))) {
    feeds[name] = new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]);
  }
  const { logits } = await session.run(feeds);
  const last = logits.data.subarray(4 * 1000, 5 * 1000);
  let next = 0;
  for (let i = 1; i < last.length; i++) if (last[i] > last[next]) next = i;
  let error = null;
  try {
    await session.run({});
  } catch (e) {
    error = e.message;
  }
  // more of the API on the same session (the parity suite's run checks): metadata, fetches, validation and engine
  // errors (engine text after ERROR_MESSAGE: is each engine's own), a decode step (concurrent runs on one session:
  // onnxruntime-web in a browser rejects them, 'Session already started'; kiln-web queues them, webgpu-extras.html)
  const errorOf = async (f) => {
    try {
      await f();
      return '(no error)';
    } catch (e) {
      return `${e.constructor.name}: ${e.message.replace(/ERROR_MESSAGE: .*/s, 'ERROR_MESSAGE: ...')}`;
    }
  };
  const errors = {
    'invalid output name': await errorOf(() => session.run(feeds, ['y'])),
    'fetches not strings': await errorOf(() => session.run(feeds, [1])),
    'extra feed': await errorOf(() => session.run({ ...feeds, extra: feeds.input_ids })),
    'wrong element type': await errorOf(() => session.run({ ...feeds, input_ids: new ort.Tensor('int32', new Int32Array(5), [1, 5]) })),
    'bad run log severity': await errorOf(() => session.run(feeds, { logSeverityLevel: 9 })),
  };
  const argmaxLast = (t) => {
    const n = t.dims[t.dims.length - 1];
    const row = t.data.subarray(t.data.length - n);
    let best = 0;
    for (let i = 1; i < n; i++) if (row[i] > row[best]) best = i;
    return best;
  };
  const fetched = await session.run(feeds, ['logits', 'present.1.value']);
  // decode: the greedy token with the presents as the past
  const all = await session.run(feeds);
  const decodeFeeds = {
    input_ids: new ort.Tensor('int64', BigInt64Array.from([BigInt(next)]), [1, 1]),
    attention_mask: new ort.Tensor('int64', new BigInt64Array(6).fill(1n), [1, 6]),
    position_ids: new ort.Tensor('int64', BigInt64Array.from([5n]), [1, 1]),
  };
  for (const name of session.inputNames.filter((n) => n.startsWith('past_key_values'))) {
    decodeFeeds[name] = all[name.replace('past_key_values', 'present')];
  }
  const decoded = await session.run(decodeFeeds);
  const more = {
    metadata: { inputs: session.inputMetadata, outputs: session.outputMetadata },
    errors,
    fetched: Object.keys(fetched).sort(),
    presentDims: Array.from(fetched['present.1.value'].dims),
    decode: { next: argmaxLast(decoded.logits), dims: Array.from(decoded.logits.dims), present: Array.from(decoded['present.0.key'].dims) },
  };
  let device = null;
  if (ep === 'webgpu') {
    const d = await ort.env.webgpu.device;
    device = { isGPUDevice: typeof GPUDevice !== 'undefined' && d instanceof GPUDevice, hasQueue: !!d?.queue };
  }
  const step = Math.max(1, Math.floor(logits.data.length / 64));
  const sample = Array.from(logits.data.filter((_, i) => i % step === 0).slice(0, 64));
  await session.release();
  return { next, dims: Array.from(logits.dims), inputs: session.inputMetadata.slice(0, 2), error, versions: ort.env.versions, device, sample, more };
}
