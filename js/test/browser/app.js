// An app written for onnxruntime-web (it only knows the `ort` namespace it is given): tiny-llama's greedy next token
// after 11, 22, 33, 44, 55 (onnxruntime: 614), metadata and one argument-validation message.
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
  let device = null;
  if (ep === 'webgpu') {
    const d = await ort.env.webgpu.device;
    device = { isGPUDevice: typeof GPUDevice !== 'undefined' && d instanceof GPUDevice, hasQueue: !!d?.queue };
  }
  const step = Math.max(1, Math.floor(logits.data.length / 64));
  const sample = Array.from(logits.data.filter((_, i) => i % step === 0).slice(0, 64));
  await session.release();
  return { next, dims: Array.from(logits.dims), inputs: session.inputMetadata.slice(0, 2), error, versions: ort.env.versions, device, sample };
}
