// kiln-web: onnxruntime-web's API (onnxruntime-common's InferenceSession, Tensor and env, unchanged) over kiln's
// wasm build. This file is the backend that onnxruntime-common calls; lib/browser.js and lib/node.js say how the
// .wasm and model files are loaded on each platform.
import * as ort from '../dist/onnxruntime-common/index.js';
import { env, registerBackend, Tensor } from '../dist/onnxruntime-common/index.js';

export const KILN_WEB_VERSION = '0.1.0';

// A platform's loaders take an optional onProgress({ loaded, total }) for that one source (a download or a file read:
// total 0 while the size is unknown, and a last call with total === loaded); core.js adds those up (loadProgress).
/** @typedef {{ loadWasm(generation: number): Promise<object>, loadModel(url: string, onProgress?: Function): Promise<Uint8Array>, loadFile(file: string | Blob | ArrayBufferLike | Uint8Array, onProgress?: Function): Promise<Uint8Array>, openFile?(file: string | Blob | ArrayBufferLike | Uint8Array, onProgress?: Function, what?: string): Promise<{ read: Function, size: number }>, checksOutputLocation?: boolean, webgpu?: boolean }} Platform */

const TYPED_ARRAYS = {
  float32: Float32Array,
  float64: Float64Array,
  float16: Uint16Array,
  int8: Int8Array,
  int16: Int16Array,
  int32: Int32Array,
  int64: BigInt64Array,
  uint8: Uint8Array,
  uint16: Uint16Array,
  uint32: Uint32Array,
  uint64: BigUint64Array,
  bool: Uint8Array,
};

// A wasm trap (a panic inside kiln) leaves that instance unusable: the next session gets a fresh instance.
const isTrap = (e) => typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError;

const asError = (e) => {
  if (e instanceof Error) return e;
  return new Error(typeof e === 'string' ? e : String(e?.message ?? e));
};

// ---- custom operators ---------------------------------------------------------------------------------------------
// { domain, opType, inputs?, outputs?, compute(inputs, attributes) }: compute gets CPU Tensors and the node's
// attributes as plain values, returns a Tensor, an array of Tensors or a record by output name (or a Promise of one).

const globalCustomOps = new Map();
const opKey = (domain, opType) => `${domain === 'ai.onnx' ? '' : (domain ?? '')}\u0000${opType}`;

function checkCustomOp(op) {
  if (!op || typeof op !== 'object') throw new TypeError('a custom operator must be an object { domain, opType, compute }');
  if (op.domain !== undefined && typeof op.domain !== 'string') throw new TypeError(`custom operator domain must be a string: ${op.domain}`);
  if (typeof op.opType !== 'string' || op.opType === '') throw new TypeError(`custom operator opType must be a non-empty string: ${op.opType}`);
  if (typeof op.compute !== 'function') throw new TypeError(`custom operator ${op.domain ?? ''}/${op.opType}: compute must be a function`);
  if (op.inputs !== undefined && !Array.isArray(op.inputs)) throw new TypeError(`custom operator ${op.domain ?? ''}/${op.opType}: inputs must be an array`);
  if (op.outputs !== undefined && !Array.isArray(op.outputs)) throw new TypeError(`custom operator ${op.domain ?? ''}/${op.opType}: outputs must be an array`);
  return op;
}

/**
 * Registers a custom operator for every session created afterwards (a session's own `customOps` override it; both
 * override kiln's built-in operators, the ai.onnx.contrib tokenizers included). Returns a function that unregisters it.
 */
export function registerCustomOp(op) {
  checkCustomOp(op);
  const key = opKey(op.domain, op.opType);
  globalCustomOps.set(key, op);
  // unregisters it again (unless something else was registered for the same op since)
  return () => {
    if (globalCustomOps.get(key) === op) globalCustomOps.delete(key);
  };
}

// An output declaration as the wasm side takes it: [type | null, dims | null] (dims: number, or null when dynamic).
function outputDecl(o) {
  if (o === undefined || o === null) return [null, null];
  if (typeof o === 'string') return [o, null];
  const dims = Array.isArray(o.dims) ? o.dims.map((d) => (typeof d === 'number' && d >= 0 ? d : null)) : null;
  return [typeof o.type === 'string' ? o.type : null, dims];
}

const inputType = (i) => (typeof i === 'string' ? i : i?.type);

function attributesOf(pairs) {
  const attributes = {};
  for (const [name, value] of pairs) {
    attributes[name] = value && typeof value === 'object' && 'tensor' in value ? decode(...value.tensor) : value;
  }
  return attributes;
}

// [type, dims, Uint8Array | string[]] → a Tensor
function decode(type, dims, data) {
  const values = type === 'string' ? data : new TYPED_ARRAYS[type](data.buffer, data.byteOffset, data.length / TYPED_ARRAYS[type].BYTES_PER_ELEMENT);
  return new Tensor(type, values, dims);
}

const describeOp = (step) => `custom operator ${step.domain || 'ai.onnx'}/${step.opType} (node \`${step.node}\`)`;

// compute's result, in the node's output order, as the wasm side takes them
function customOutputs(step, result) {
  const names = step.outputs;
  let list;
  if (Array.isArray(result)) list = result;
  else if (result && typeof result === 'object' && 'dims' in result && 'type' in result) list = [result];
  else if (result && typeof result === 'object') {
    list = names.map((n) => {
      if (!(n in result)) throw new Error(`${describeOp(step)}: compute returned no output '${n}'`);
      return result[n];
    });
  } else throw new Error(`${describeOp(step)}: compute must return a Tensor, an array of Tensors or a record of Tensors, got ${result}`);
  if (list.length !== names.length) {
    throw new Error(`${describeOp(step)}: compute returned ${list.length} output(s), the node has ${names.length} (${names.join(', ')})`);
  }
  return list.map((t, i) => {
    if (!t || typeof t !== 'object' || !('dims' in t) || !('type' in t)) throw new Error(`${describeOp(step)}: output ${i} is not a Tensor`);
    return encode(t, `output "${names[i]}" of ${describeOp(step)}`);
  });
}

// ---- gpu-buffer tensors (onnxruntime-web's preferredOutputLocation 'gpu-buffer' / Tensor.fromGpuBuffer) ------------
// An output kiln leaves on the GPU is a value in the wasm instance's registry (a number); its Tensor (and the
// GPUBuffer behind it) map back to that value, so feeding the tensor to a run binds kiln's value without a copy (a
// present.* fed back as past_key_values.* is a KV store appended in place). A GPUBuffer kiln did not make is copied
// GPU to GPU into a buffer kiln made (on kiln's GPUDevice, env.webgpu.device).

/** kiln-made gpu-buffer Tensor → { id, wasm, type, dims, released } */
const gpuTensors = new WeakMap();
/** a GPUBuffer kiln handed out → the same handle */
const gpuBuffers = new WeakMap();
// a gpu-buffer tensor collected without dispose(): its registry entry goes (its buffer to the garbage collector)
const gpuCollected =
  typeof FinalizationRegistry === 'undefined'
    ? null
    : new FinalizationRegistry((handle) => {
        if (!handle.released && !handle.wasm.dead) {
          handle.released = true;
          handle.wasm.exports.releaseGpuValue(handle.id, false);
        }
      });

// onnxruntime-web's bytes per element of a gpu-buffer tensor (its layout on the GPU)
const GPU_BYTES = { float32: 4, float16: 2, int32: 4, uint32: 4, int64: 8, uint8: 1, bool: 1 };
// the types onnxruntime-web creates gpu-buffer outputs of (isGpuBufferSupportedType)
const GPU_OUTPUT_TYPES = ['float32', 'float16', 'int32', 'int64', 'uint32', 'uint8', 'bool', 'uint4', 'int4'];
// types whose layout on kiln's GPU is WebGPU's (an application's buffer of these is copied GPU to GPU; int64, uint8
// and bool live on kiln's GPU as 32-bit words, so those buffers are read back and fed from the host)
const GPU_COPY_TYPES = ['float32', 'float16', 'int32', 'uint32'];

// Steps a wasm task (a download) to its end, like a run.
async function stepped(task, wasm) {
  try {
    for (;;) {
      const step = task.step();
      if (step.done) return step.result;
      await step.wait;
    }
  } finally {
    if (!wasm.dead) task.free();
  }
}

// A gpu-buffer output: [type, dims, id, GPUBuffer, contiguous] from the wasm side → onnxruntime-common's Tensor
function gpuOutput(wasm, type, dims, id, buffer, contiguous) {
  const handle = { id, wasm, type, dims: Array.from(dims), released: false };
  const release = (destroy) => {
    if (handle.released) return;
    handle.released = true;
    if (!wasm.dead) wasm.exports.releaseGpuValue(id, destroy);
  };
  const download = async () => {
    if (handle.released || wasm.dead) throw new Error('The tensor is disposed.');
    const [t, d, data] = await stepped(wasm.exports.startGpuDownload(id), wasm);
    return decode(t, d, data).data;
  };
  const tensor = new Tensor({ location: 'gpu-buffer', type, dims: handle.dims, gpuBuffer: buffer, download, dispose: () => release(true) });
  gpuTensors.set(tensor, handle);
  if (contiguous) gpuBuffers.set(buffer, handle);
  else {
    // a KV store (spare rows along the sequence axis): tensor.gpuBuffer is a buffer holding exactly the tensor,
    // copied on first use; feeding the tensor itself binds the store
    let exact;
    Object.defineProperty(tensor, 'gpuBuffer', {
      configurable: true,
      enumerable: false,
      get() {
        this.ensureValid();
        // (released by getData(true): the store's buffer, as onnxruntime-web keeps its buffer object)
        if (!exact && handle.released) return buffer;
        if (!exact) {
          exact = wasm.exports.gpuValueBuffer(id);
          gpuBuffers.set(exact, handle);
        }
        return exact;
      },
    });
  }
  gpuCollected?.register(tensor, handle);
  return tensor;
}

const sizeOf = (dims) => dims.reduce((a, b) => a * b, 1);

class KilnSessionHandler {
  constructor(instance, native, customOps = new Map(), preferredOutputLocation = undefined) {
    this.preferredOutputLocation = preferredOutputLocation;
    this.instance = instance;
    this.native = native;
    this.customOps = customOps;
    this.inputMetadata = Object.freeze(native.inputMetadata());
    this.outputMetadata = Object.freeze(native.outputMetadata());
    this.inputNames = Object.freeze(this.inputMetadata.map((m) => m.name));
    this.outputNames = Object.freeze(this.outputMetadata.map((m) => m.name));
    this.queue = Promise.resolve();
    this.onWebGpu = native.executionProvider() === 'webgpu';
  }

  async dispose() {
    // Queued runs finish first.
    await this.queue;
    if (this.native) {
      const native = this.native;
      this.native = null;
      if (!this.instance.dead) native.free();
    }
  }

  startProfiling() {}

  endProfiling() {}

  // Runs on one session are serialised: each waits for the previous one, whatever its outcome.
  run(feeds, fetches, options) {
    const result = this.queue.then(() => this.runNow(feeds, fetches, options));
    this.queue = result.then(
      () => {},
      () => {},
    );
    return result;
  }

  // Every run is stepped from here: kiln runs until it waits on the browser (the WebGPU provider: `step.wait`, a
  // promise to await), until a custom node (its inputs are handed here, this awaits the operator's compute and hands
  // the outputs back; a throwing compute fails the run, the session stays usable), or until the end. Each step is a
  // synchronous call, so a wasm trap is an exception caught here, never an uncaught one.
  async runStepped(inputs, names, locations, trapped) {
    let run;
    try {
      run = this.native.startRun(inputs, names, locations);
    } catch (e) {
      throw trapped(e);
    }
    try {
      for (;;) {
        let step;
        try {
          step = run.step();
        } catch (e) {
          throw trapped(e);
        }
        if (step.done) return step.results;
        if (step.wait) {
          await step.wait;
          continue;
        }
        try {
          const op = this.customOps.get(opKey(step.domain, step.opType));
          if (!op) throw new Error(`${describeOp(step)} is not registered`);
          const tensors = step.inputs.map((entry) => decode(...entry));
          if (op.inputs) {
            if (op.inputs.length !== tensors.length) {
              throw new Error(`${describeOp(step)}: the node has ${tensors.length} input(s), the operator declares ${op.inputs.length}`);
            }
            op.inputs.forEach((want, i) => {
              const type = inputType(want);
              if (type && type !== tensors[i].type) throw new Error(`${describeOp(step)}: input ${i} is ${tensors[i].type}, the operator declares ${type}`);
            });
          }
          const result = await op.compute(tensors, attributesOf(step.attributes));
          run.resume(customOutputs(step, result));
        } catch (e) {
          if (this.instance.dead || isTrap(e)) throw trapped(e);
          const message = e instanceof Error ? e.message : String(e);
          run.fail(message.includes(describeOp(step)) ? message : `${describeOp(step)}: ${message}`);
        }
      }
    } finally {
      if (!this.instance.dead) run.free();
    }
  }

  async runNow(feeds, fetches, options) {
    if (!this.native) throw new Error('cannot run inference. the session has been released.');
    if (this.instance.dead) {
      throw new Error('cannot run inference. kiln hit an internal error in an earlier call; create the session again.');
    }
    const inputs = [];
    const gpuFeeds = [];
    for (const [name, tensor] of Object.entries(feeds)) {
      if (this.inputNames.indexOf(name) === -1) throw new Error(`invalid input '${name}'`);
      if (tensor.location === 'gpu-buffer' && this.onWebGpu) gpuFeeds.push([name, tensor]);
      else inputs.push([name, ...encode(tensor, `input "${name}"`, false, this.onWebGpu)]);
    }
    const names = Object.keys(fetches);
    for (const name of names) {
      if (this.outputNames.indexOf(name) === -1) throw new Error(`invalid output '${name}'`);
      const pre = fetches[name];
      if (pre) encode(pre, `output "${name}"`, true, this.onWebGpu);
    }
    validateRunOptions(options);
    // outputs kiln leaves on the GPU (onnxruntime-web's preferredOutputLocation; on 'webgpu' only)
    const locations = names.map((name) => {
      const location = this.onWebGpu && !fetches[name] ? this.outputLocation(name) : 'cpu';
      if (location === 'gpu-buffer' && this.outputMetadata.find((m) => m.name === name)?.type === 'string') {
        throw new Error('String tensor is not supported on GPU.');
      }
      return location;
    });
    // gpu-buffer feeds: kiln's own values by identity, other GPUBuffers copied into buffers kiln made (freed after
    // the run)
    const temporary = [];
    try {
      for (const [name, tensor] of gpuFeeds) inputs.push(await this.gpuFeed(name, tensor, temporary));
      return await this.runWith(inputs, names, locations, fetches);
    } finally {
      for (const id of temporary) if (!this.instance.dead) this.instance.exports.releaseGpuValue(id, true);
    }
  }

  outputLocation(name) {
    const where = this.preferredOutputLocation;
    const location = typeof where === 'string' ? where : (where?.[name] ?? 'cpu');
    return location === 'gpu-buffer' ? 'gpu-buffer' : 'cpu';
  }

  // One gpu-buffer feed on 'webgpu' as the wasm side takes it: [name, id] (a GPU value) or a host entry.
  async gpuFeed(name, tensor, temporary) {
    const what = `input "${name}"`;
    const { type } = tensor;
    const dims = Array.from(tensor.dims);
    if (type === 'string') throw new Error('String tensor is not supported on GPU.');
    const mine = gpuTensors.get(tensor);
    const known = mine ?? gpuBuffers.get(tensor.gpuBuffer);
    if (known && known.type === type && known.dims.length === dims.length && known.dims.every((d, i) => d === dims[i])) {
      if (known.wasm !== this.instance) {
        throw new Error(`kiln-web: ${what} is a gpu-buffer tensor of a kiln instance that hit an internal error; create it again`);
      }
      if (known.released) throw new Error(`kiln-web: ${what} is a gpu-buffer tensor whose buffer was released (dispose() or getData(true))`);
      return [name, known.id];
    }
    // an application's GPUBuffer (Tensor.fromGpuBuffer): it must live on kiln's GPUDevice (env.webgpu.device)
    const buffer = tensor.gpuBuffer;
    if (typeof GPUBuffer === 'undefined' || !(buffer instanceof GPUBuffer)) {
      throw new Error(`kiln-web: ${what}: tensor.gpuBuffer is not a GPUBuffer`);
    }
    const device = this.native.webgpuDevice();
    const count = sizeOf(dims);
    const bytes = GPU_BYTES[type] === undefined ? undefined : count * GPU_BYTES[type];
    if (bytes === undefined) throw new Error(`kiln-web: ${what}: gpu-buffer tensors of type ${type} are not supported (${Object.keys(GPU_BYTES).join(', ')} are)`);
    if (buffer.size < bytes) {
      throw new Error(`kiln-web: ${what}: the GPUBuffer holds ${buffer.size} bytes, a ${type} tensor of dims [${dims}] needs ${bytes}`);
    }
    if (!(buffer.usage & GPUBufferUsage.COPY_SRC)) {
      throw new Error(`kiln-web: ${what}: kiln copies an application's GPUBuffer into its own, so the buffer needs GPUBufferUsage.COPY_SRC`);
    }
    // (at least 4 bytes, also for an empty tensor: the copy is what tells a buffer of another device)
    const copy = Math.min(Math.max(4, Math.ceil(bytes / 4) * 4), buffer.size - (buffer.size % 4));
    // the copy runs inside an error scope: a buffer of another GPUDevice (or a destroyed one) is a validation error
    const submitCopy = async (dst) => {
      device.pushErrorScope('validation');
      const encoder = device.createCommandEncoder();
      if (copy > 0) encoder.copyBufferToBuffer(buffer, 0, dst, 0, copy);
      device.queue.submit([encoder.finish()]);
      const error = await device.popErrorScope();
      if (error) {
        throw new Error(
          `kiln-web: ${what}: its GPUBuffer cannot be used on kiln's GPUDevice (env.webgpu.device; a gpu-buffer tensor must be made on that device): ${error.message}`,
        );
      }
    };
    if (GPU_COPY_TYPES.includes(type)) {
      const [id, dst] = this.native.allocGpuInput(type, dims);
      temporary.push(id);
      await submitCopy(dst);
      return [name, id];
    }
    // int64, uint8, bool: onnxruntime-web's layout differs from kiln's GPU one; read back and fed from the host
    const staging = device.createBuffer({ size: Math.max(4, copy), usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    try {
      await submitCopy(staging);
      await staging.mapAsync(GPUMapMode.READ);
      const data = new Uint8Array(staging.getMappedRange().slice(0, bytes));
      staging.unmap();
      return [name, type, dims, data];
    } finally {
      staging.destroy();
    }
  }

  async runWith(inputs, names, locations, fetches) {
    let results;
    const trapped = (e) => {
      if (isTrap(e)) {
        this.instance.dead = true;
        return new Error(
          `failed to call OrtRun(). ERROR_CODE: 6, ERROR_MESSAGE: kiln hit an internal error (wasm trap: ${e.message}); ` +
            'this session can no longer run, create it again',
        );
      }
      return asError(e);
    };
    results = await this.runStepped(inputs, names, locations, trapped);
    const out = {};
    const unsupported = results.find((r) => typeof r[3] === 'number' && !GPU_OUTPUT_TYPES.includes(r[1]));
    if (unsupported) {
      for (const r of results) if (typeof r[3] === 'number') this.instance.exports.releaseGpuValue(r[3], true);
      throw new Error(`Unsupported data type: ${unsupported[1]}`);
    }
    for (const [name, type, dims, data, buffer, contiguous] of results) {
      if (typeof data === 'number') {
        // left on the GPU; an empty one comes back as a CPU tensor, as in onnxruntime-web
        if (sizeOf(dims) > 0) {
          out[name] = gpuOutput(this.instance, type, dims, data, buffer, contiguous);
          continue;
        }
        this.instance.exports.releaseGpuValue(data, true);
        out[name] = new Tensor(type, new TYPED_ARRAYS[type](0), dims);
        continue;
      }
      const pre = fetches[name];
      const values = type === 'string' ? data : new TYPED_ARRAYS[type](data.buffer, data.byteOffset, data.length / TYPED_ARRAYS[type].BYTES_PER_ELEMENT);
      if (pre) {
        if (pre.type !== type || pre.dims.length !== dims.length || pre.dims.some((d, i) => d !== dims[i])) {
          throw new Error(
            `failed to call OrtRun(). ERROR_CODE: 2, ERROR_MESSAGE: pre-allocated output "${name}" is ${pre.type} [${pre.dims}] but the output is ${type} [${dims}]`,
          );
        }
        if (type === 'string') pre.data.splice(0, pre.data.length, ...values);
        else pre.data.set(values);
        out[name] = pre;
      } else {
        out[name] = new Tensor(type, values, dims);
      }
    }
    return out;
  }
}

// onnxruntime-web's checks of session options, in its order and words (lib/wasm/session-options.ts).
function validateSessionOptions(options) {
  const level = options.graphOptimizationLevel ?? 'all';
  if (!['disabled', 'basic', 'extended', 'layout', 'all'].includes(level)) {
    throw new Error(`unsupported graph optimization level: ${level}`);
  }
  const mode = options.executionMode ?? 'sequential';
  if (mode !== 'sequential' && mode !== 'parallel') throw new Error(`unsupported execution mode: ${mode}`);
  const severity = options.logSeverityLevel ?? 2;
  if (!Number.isInteger(severity) || severity < 0 || severity > 4) throw new Error(`log severity level is not valid: ${severity}`);
  const verbosity = options.logVerbosityLevel ?? 0;
  if (!Number.isInteger(verbosity) || verbosity < 0 || verbosity > 4) throw new Error(`log verbosity level is not valid: ${verbosity}`);
  if (options.enableGraphCapture !== undefined && typeof options.enableGraphCapture !== 'boolean') {
    throw new Error(`enableGraphCapture must be a boolean value: ${options.enableGraphCapture}`);
  }
}

// onnxruntime-web's checks of run options (lib/wasm/run-options.ts).
function validateRunOptions(options = {}) {
  const severity = options.logSeverityLevel;
  if (severity !== undefined && (typeof severity !== 'number' || !Number.isInteger(severity) || severity < 0 || severity > 4)) {
    throw new Error(`log severity level is not valid: ${severity}`);
  }
  const verbosity = options.logVerbosityLevel;
  if (verbosity !== undefined && (typeof verbosity !== 'number' || !Number.isInteger(verbosity))) {
    throw new Error(`log verbosity level is not valid: ${verbosity}`);
  }
}

// A tensor as the wasm side takes it: [type, dims, Uint8Array | string[]]; onnxruntime-web's messages.
function encode(tensor, what, isOutput = false, onWebGpu = false) {
  if (tensor.location === 'gpu-buffer' && onWebGpu) {
    // gpu-buffer feeds on 'webgpu' are bound by KilnSessionHandler.gpuFeed; a pre-allocated gpu-buffer output is not
    throw new Error(`kiln-web: ${what} is a pre-allocated gpu-buffer tensor; kiln-web takes pre-allocated outputs on the CPU only`);
  }
  if (tensor.location === 'gpu-buffer') throw new Error('Tensor location "gpu-buffer" is not supported without using WebGPU.');
  if (tensor.location === 'ml-tensor') throw new Error('Tensor location "ml-tensor" is not supported without using WebNN.');
  if (tensor.location !== 'cpu' && tensor.location !== 'cpu-pinned') {
    throw new Error(`invalid data location: ${tensor.location} for ${what}`);
  }
  if (isOutput) return null;
  const { type, dims, data } = tensor;
  if (type === 'string') {
    for (let i = 0; i < data.length; i++) {
      if (typeof data[i] !== 'string') throw new TypeError(`tensor data at index ${i} is not a string`);
    }
    return [type, Array.from(dims), Array.from(data)];
  }
  return [type, Array.from(dims), new Uint8Array(data.buffer, data.byteOffset, data.byteLength)];
}

async function fetchOk(url, what) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`failed to load ${what}: ${url} (HTTP ${response.status})`);
  return response;
}

// Reads a response's body chunk by chunk into `take(chunk)`, calling onProgress({ loaded, total }) once the headers
// are in (when Content-Length says the size) and after each chunk (total: Content-Length, 0 when the server does not
// say), then once more with total = loaded if that was not the last call's (the size is known now).
async function readWithProgress(response, onProgress, take) {
  const size = Number(response.headers.get('Content-Length')) || 0;
  // (a compressed body's Content-Length is less than the bytes read: total follows loaded then)
  const totalAt = (loaded) => (size ? Math.max(size, loaded) : 0);
  let loaded = 0;
  if (size) onProgress({ loaded, total: size });
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    take(value, loaded);
    loaded += value.length;
    onProgress({ loaded, total: totalAt(loaded) });
  }
  if (totalAt(loaded) !== loaded) onProgress({ loaded, total: loaded });
  return loaded;
}

/**
 * Downloads a URL, calling onProgress({ loaded, total }) as bytes arrive (total: 0 while the server has not said the
 * size; the last call has loaded === total).
 */
export async function fetchWithProgress(url, onProgress, what = 'model') {
  const response = await fetchOk(url, what);
  if (!onProgress || !response.body) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    onProgress?.({ loaded: bytes.length, total: bytes.length });
    return bytes;
  }
  let buffer = new Uint8Array(Number(response.headers.get('Content-Length')) || 1 << 20);
  const loaded = await readWithProgress(response, onProgress, (value, at) => {
    if (at + value.length > buffer.length) {
      const grown = new Uint8Array(Math.max(buffer.length * 2, at + value.length));
      grown.set(buffer.subarray(0, at));
      buffer = grown;
    }
    buffer.set(value, at);
  });
  return loaded === buffer.length ? buffer : buffer.slice(0, loaded);
}

// the chunks of a download gathered into a Blob every 16 MiB, so that no more than that is held in JS memory besides
// the Blobs
const BLOB_BATCH = 16 << 20;

/** Downloads a URL into a Blob (its bytes outside wasm memory), calling onProgress like fetchWithProgress. */
export async function fetchBlobWithProgress(url, onProgress, what) {
  const response = await fetchOk(url, what);
  if (!onProgress || !response.body) {
    const blob = await response.blob();
    onProgress?.({ loaded: blob.size, total: blob.size });
    return blob;
  }
  const blobs = [];
  let chunks = [];
  let held = 0;
  await readWithProgress(response, onProgress, (value) => {
    chunks.push(value);
    held += value.length;
    if (held >= BLOB_BATCH) {
      blobs.push(new Blob(chunks));
      chunks = [];
      held = 0;
    }
  });
  blobs.push(new Blob(chunks));
  return blobs.length === 1 ? blobs[0] : new Blob(blobs);
}

// The size of a source already in memory (bytes, a Blob); undefined for one to load (a URL, a path).
function sizeInMemory(data) {
  if (data instanceof Uint8Array || data instanceof ArrayBuffer) return data.byteLength;
  if (typeof SharedArrayBuffer !== 'undefined' && data instanceof SharedArrayBuffer) return data.byteLength;
  if (typeof Blob !== 'undefined' && data instanceof Blob) return data.size;
  return undefined;
}

/**
 * onProgress over a whole session load (kiln-web): the model and every external data file as one { loaded, total }.
 * Each source counts in total with its size once known (Content-Length, a Blob's size, a byte length; a download
 * without Content-Length counts 0 until it has ended) and in loaded with the bytes that arrived; sources in memory
 * count as loaded from the start. loaded never decreases, and the last call (finish) has loaded === total. Nothing is
 * reported when nothing is loaded (a model and its external data all given in memory). Returns each source's progress
 * callback for its platform loader (undefined for one in memory, or when nothing reports: it loads without progress)
 * and finish().
 */
function loadProgress(onProgress, sources) {
  const active = Boolean(onProgress) && sources.some((s) => sizeInMemory(s) === undefined);
  const parts = [];
  let last;
  const report = () => {
    let loaded = 0;
    let total = 0;
    for (const p of parts) {
      loaded += p.loaded;
      total += p.total;
    }
    if (last && last.loaded === loaded && last.total === total) return;
    last = { loaded, total };
    onProgress({ loaded, total });
  };
  const source = (data) => {
    if (!active) return undefined;
    const size = sizeInMemory(data);
    const part = { loaded: size ?? 0, total: size ?? 0 };
    parts.push(part);
    if (size !== undefined) return undefined;
    return ({ loaded, total }) => {
      part.loaded = Math.max(part.loaded, loaded);
      part.total = total;
      report();
    };
  };
  return {
    callbacks: sources.map(source),
    /** Every source is loaded: the last call, loaded === total. */
    finish() {
      if (!active) return;
      for (const p of parts) p.total = p.loaded;
      report();
    },
  };
}

const SRI_ALGORITHMS = { sha256: 'SHA-256', sha384: 'SHA-384', sha512: 'SHA-512' };

/** Bytes of a streamed model hashed at a time (`checkIntegrity` over a source). */
const INTEGRITY_CHUNK = 8 << 20;

/**
 * Checks bytes against a Subresource Integrity string (`'sha256-<base64>'`, several space-separated hashes allowed:
 * any one matching passes, as in browsers). `model`: the bytes, or a streamed model's source (`{ read(offset,
 * length), size }`), hashed `INTEGRITY_CHUNK` bytes at a time through kiln's incremental SHA-2 (`Digest`, from the
 * wasm module's exports) so that the model is never read whole.
 */
export async function checkIntegrity(model, integrity, exports) {
  const wanted = String(integrity)
    .trim()
    .split(/\s+/)
    .map((h) => /^(sha256|sha384|sha512)-([A-Za-z0-9+/=_-]+)(\?.*)?$/.exec(h))
    .filter(Boolean);
  if (wanted.length === 0) throw new TypeError(`unsupported integrity value: ${integrity} (expected sha256-, sha384- or sha512-<base64>)`);
  const streamed = typeof model?.read === 'function';
  const digests = new Map();
  if (streamed) {
    // one pass over the source for every algorithm asked
    const hashers = new Map([...new Set(wanted.map((w) => w[1]))].map((alg) => [alg, new exports.Digest(alg)]));
    try {
      for (let offset = 0; offset < model.size; offset += INTEGRITY_CHUNK) {
        const chunk = await model.read(offset, Math.min(INTEGRITY_CHUNK, model.size - offset));
        for (const h of hashers.values()) h.update(chunk);
      }
      for (const [alg, h] of hashers) digests.set(alg, h.finish());
    } finally {
      for (const h of hashers.values()) h.free();
    }
  }
  const got = [];
  for (const [, alg, hash] of wanted) {
    const digest = streamed ? digests.get(alg) : new Uint8Array(await globalThis.crypto.subtle.digest(SRI_ALGORITHMS[alg], model));
    let binary = '';
    for (const b of digest) binary += String.fromCharCode(b);
    const b64 = btoa(binary);
    if (b64 === hash.replace(/-/g, '+').replace(/_/g, '/')) return;
    got.push(`${alg}-${b64}`);
  }
  throw new Error(`the model does not match its integrity value: expected ${integrity}, got ${got.join(' ')}`);
}

const LOG_LEVELS = ['verbose', 'info', 'warning', 'error', 'fatal'];
const warns = () => LOG_LEVELS.indexOf(env.logLevel ?? 'warning') <= 2;

/** kiln's kernel tuning for a session: `extra.kiln.gpuTuning` ('gpu' or 'cpu') when given; else kiln decides from
 * the adapter (a fallback adapter such as SwiftShader takes the CPU tuning). */
function gpuTuning(options) {
  const asked = options.extra?.kiln?.gpuTuning;
  return asked === 'gpu' || asked === 'cpu' ? asked : undefined;
}

/** A boolean switch of kiln's own session config, `extra.kiln[name]` (onnxruntime-web ignores `extra` entries it
 * does not know); undefined (kiln's default) when absent or not a boolean. */
function kilnSwitch(options, name) {
  const v = options.extra?.kiln?.[name];
  return typeof v === 'boolean' ? v : undefined;
}

// onnxruntime-web's checks before its WebGPU backend initialises (same order and words): WebGPU in this environment
// (Node has no navigator.gpu), env.webgpu.adapter / powerPreference / forceFallbackAdapter valid, and an adapter.
// kiln then requests its own adapter and device per session (wgpu's request_adapter, high-performance).
async function checkWebGpu() {
  if (typeof navigator === 'undefined' || !navigator.gpu) throw new Error('WebGPU is not supported in current environment');
  let adapter = env.webgpu.adapter;
  if (adapter) {
    if (typeof adapter.limits !== 'object' || typeof adapter.features !== 'object' || typeof adapter.requestDevice !== 'function') {
      throw new Error('Invalid GPU adapter set in `env.webgpu.adapter`. It must be a GPUAdapter object.');
    }
  } else {
    const powerPreference = env.webgpu.powerPreference;
    if (powerPreference !== undefined && powerPreference !== 'low-power' && powerPreference !== 'high-performance') {
      throw new Error(`Invalid powerPreference setting: "${powerPreference}"`);
    }
    const forceFallbackAdapter = env.webgpu.forceFallbackAdapter;
    if (forceFallbackAdapter !== undefined && typeof forceFallbackAdapter !== 'boolean') {
      throw new Error(`Invalid forceFallbackAdapter setting: "${forceFallbackAdapter}"`);
    }
    adapter = await navigator.gpu.requestAdapter({ powerPreference, forceFallbackAdapter });
    if (!adapter) throw new Error('Failed to get GPU adapter. You may need to enable flag "--enable-unsafe-webgpu" if you are using Chrome.');
  }
}

// The GPUDevice of the first session kiln created on 'webgpu' (env.webgpu.device's value).
let webgpuDevice;

// env.webgpu.device: onnxruntime-web's getter resolves to its GPUDevice; kiln creates its device with a session on
// 'webgpu', so before one exists the promise rejects. An application's own GPUDevice cannot be adopted: wgpu 30 (kiln's
// WebGPU layer) only creates devices itself, it has no constructor from an existing GPUDevice.
function defineWebGpuDevice() {
  Object.defineProperty(env.webgpu, 'device', {
    configurable: true,
    enumerable: true,
    get() {
      if (webgpuDevice) return Promise.resolve(webgpuDevice);
      return Promise.reject(
        new Error("kiln-web: env.webgpu.device is available once a session was created on 'webgpu' (kiln creates its GPUDevice with the session)"),
      );
    },
    set(value) {
      if (value === undefined) return;
      throw new Error(
        'kiln-web: env.webgpu.device cannot be set: kiln creates its own GPUDevice (wgpu 30 cannot adopt an existing one); read env.webgpu.device after creating a session on \'webgpu\' to share kiln\'s device instead',
      );
    },
  });
}

/** Makes the backend for one platform and registers it under onnxruntime-web's names. */
export function registerKiln(/** @type {Platform} */ platform) {
  defineWebGpuDevice();
  let instance = null; // { exports, dead }
  let generation = 0;
  const wasmInstance = async () => {
    if (!instance || instance.dead) instance = { exports: await platform.loadWasm(generation++), dead: false };
    return instance;
  };

  const backend = {
    async init(name) {
      await wasmInstance();
      if (name === 'webgpu') await checkWebGpu();
    },
    async createInferenceSessionHandler(pathOrBuffer, options = {}) {
      // kiln-web's additions: onProgress({ loaded, total }) while the model and its external data load (loadProgress);
      // integrity ('sha256-...')
      const onProgress = typeof options.onProgress === 'function' ? options.onProgress : undefined;
      const entries = Array.isArray(options.externalData) ? options.externalData : [];
      const progress = loadProgress(onProgress, [pathOrBuffer, ...entries.map((e) => (typeof e === 'string' ? e : e?.data))]);
      const [modelProgress, ...fileProgress] = progress.callbacks;
      const eps = (options.executionProviders ?? []).map((ep) => (typeof ep === 'string' ? ep : ep.name));
      // custom operators: the global ones, then the session's (later entries win)
      const customOps = new Map(globalCustomOps);
      if (options.customOps !== undefined) {
        if (!Array.isArray(options.customOps)) throw new TypeError('customOps must be an array');
        for (const op of options.customOps) customOps.set(opKey(checkCustomOp(op).domain, op.opType), op);
      }
      // on 'webgpu' (no custom operators) the model and its external data stay on the JS side (a URL fetched into a
      // Blob, whose bytes live outside wasm memory) and kiln reads them a range at a time: the model's protobuf
      // without the data of its large initializers, which go from the Blob straight into their GPU buffers, like
      // large external weights; elsewhere both are copied into wasm memory whole
      const streams = eps[0] === 'webgpu' && customOps.size === 0 && typeof platform.openFile === 'function';
      const modelSource = streams ? await platform.openFile(pathOrBuffer, modelProgress, 'model') : undefined;
      const model = modelSource ? new Uint8Array(0) : typeof pathOrBuffer === 'string' ? await platform.loadModel(pathOrBuffer, modelProgress) : pathOrBuffer;
      if (options.integrity !== undefined) await checkIntegrity(modelSource ?? model, options.integrity, (await wasmInstance()).exports);
      validateSessionOptions(options);
      const freeDims = [];
      if (options.freeDimensionOverrides) {
        for (const [name, value] of Object.entries(options.freeDimensionOverrides)) {
          if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
            throw new Error(`free dimension override value must be a non-negative integer: ${value}`);
          }
          freeDims.push([name, value]);
        }
      }
      const level = options.graphOptimizationLevel ?? 'all';
      const externalData = [];
      const externalSources = [];
      let i = 0;
      for (const entry of options.externalData ?? []) {
        const path = typeof entry === 'string' ? entry : entry.path;
        const data = typeof entry === 'string' ? entry : entry.data;
        const onFile = fileProgress[i++];
        if (streams) externalSources.push([path, (await platform.openFile(data, onFile)).read]);
        else externalData.push([path, await platform.loadFile(data, onFile)]);
      }
      progress.finish();
      const wasm = await wasmInstance();
      try {
        const load = wasm.exports.KilnSession.startLoad(model, {
          executionProviders: eps,
          graphOptimizationLevel: level,
          freeDimensionOverrides: freeDims,
          externalData,
          externalSources,
          // the model itself read a range at a time (its bytes then are `model`'s empty array)
          modelSource: modelSource?.read,
          modelSize: modelSource?.size,
          customOps: [...customOps.values()].map((op) => [op.domain ?? '', op.opType, (op.outputs ?? []).map(outputDecl)]),
          // kiln's adapter request on 'webgpu' (its first session's: the sessions share one GPUDevice)
          powerPreference: env.webgpu.powerPreference,
          forceFallbackAdapter: env.webgpu.forceFallbackAdapter,
          // kiln's own session config (onnxruntime-web ignores `extra` entries it does not know): float16 models'
          // fused attention on 'webgpu', on unless false (kiln_graph::passes::f16_fused_attention)
          f16FusedAttention: kilnSwitch(options, 'f16FusedAttention'),
          // float16 products in float16 models' matmuls and attention where the adapter has shader-f16, on unless
          // false (kiln_graph::passes::float16_math)
          f16Math: kilnSwitch(options, 'f16Math'),
          // the kernels' tuning when the app forces it (else narrow workgroups on a CPU adapter, wide on a GPU)
          gpuTuning: gpuTuning(options),
        });
        let native;
        try {
          for (;;) {
            const step = load.step();
            if (step.done) {
              native = step.session;
              break;
            }
            await step.wait;
          }
        } finally {
          if (!wasm.dead) load.free();
        }
        // asked for 'webgpu' first but on the CPU (the model has custom operators, or kiln could not use the
        // adapter): say why, like onnxruntime-web's warning for an execution provider it removes
        if (eps[0] === 'webgpu' && native.executionProvider() !== 'webgpu' && warns()) {
          console.warn(`kiln-web: ${native.providerNote() ?? 'execution provider webgpu is not used'}`);
        }
        if (native.executionProvider() === 'webgpu' && !webgpuDevice) webgpuDevice = native.webgpuDevice();
        const handler = new KilnSessionHandler(wasm, native, customOps, options.preferredOutputLocation);
        // onnxruntime-web's WebGPU-enabled builds (browsers; not Node's) check preferredOutputLocation once the model
        // is loaded
        for (const name of platform.checksOutputLocation ? handler.outputNames : []) {
          const where = options.preferredOutputLocation;
          const location = typeof where === 'string' ? where : (where?.[name] ?? 'cpu');
          if (!['cpu', 'cpu-pinned', 'gpu-buffer', 'ml-tensor'].includes(location)) {
            native.free();
            throw new Error(`Not supported preferred output location: ${location}.`);
          }
        }
        return handler;
      } catch (e) {
        if (isTrap(e)) {
          wasm.dead = true;
          throw new Error(`Can't create a session. ERROR_CODE: 6, ERROR_MESSAGE: kiln hit an internal error (wasm trap: ${e.message})`);
        }
        throw asError(e);
      }
    },
  };
  // kiln-web's tokenizer helpers: ONNX models around the ai.onnx.contrib tokenizer ops (bytes to create a session on)
  const text = (v, what) => {
    if (typeof v === 'string') return v;
    if (v instanceof Uint8Array || v instanceof ArrayBuffer) return new TextDecoder().decode(v);
    if (v && typeof v === 'object') return JSON.stringify(v);
    if (v === undefined || v === null) return '';
    throw new TypeError(`${what} must be a string, bytes or an object`);
  };
  const helper = (f) => async (...args) => {
    const wasm = await wasmInstance();
    try {
      return f(wasm.exports, ...args);
    } catch (e) {
      if (isTrap(e)) wasm.dead = true;
      throw asError(e);
    }
  };
  // one backend under the three names, like onnxruntime-web: an available 'webgpu' keeps 'wasm' in the session's
  // list (kiln's fallback), an unavailable one is removed with onnxruntime-common's warning
  // (Node: not registered, as in onnxruntime-web's Node build: asking for it gives "backend not found.")
  if (platform.webgpu) registerBackend('webgpu', backend, 5);
  registerBackend('cpu', backend, 10);
  registerBackend('wasm', backend, 10);
  Object.defineProperty(env.versions, 'web', { value: env.versions.common, enumerable: true });
  Object.defineProperty(env.versions, 'kiln', { value: KILN_WEB_VERSION, enumerable: true });
  return {
    /** tokenizer.json (+ tokenizer_config.json) → an ONNX model: `input_text` string [N] → `input_ids`, `attention_mask`. */
    modelFromTokenizerJson: helper((x, json, config) =>
      x.modelFromTokenizerJson(text(json, 'tokenizerJson'), text(config, 'tokenizerConfigJson')),
    ),
    /** kiln-web only: the bytes of kiln's wasm memory (its tests check that streamed weights stay out of it). */
    kilnWasmMemoryBytes: helper((x) => x.wasmMemoryBytes()),
    /** The decoder: `ids` int64 [N, L] → `text` string [N]. */
    decoderModelFromTokenizerJson: helper((x, json, config, options = {}) =>
      x.decoderModelFromTokenizerJson(text(json, 'tokenizerJson'), text(config, 'tokenizerConfigJson'), Boolean(options.skipSpecialTokens)),
    ),
  };
}

export { ort };
