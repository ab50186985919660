// kiln-web: onnxruntime-web's API (onnxruntime-common's InferenceSession, Tensor and env, unchanged) over kiln's
// wasm build. This file is the backend that onnxruntime-common calls; lib/browser.js and lib/node.js say how the
// .wasm and model files are loaded on each platform.
import * as ort from '../dist/onnxruntime-common/index.js';
import { env, registerBackend, Tensor } from '../dist/onnxruntime-common/index.js';

export const KILN_WEB_VERSION = '0.1.0';

/** @typedef {{ loadWasm(generation: number): Promise<object>, loadModel(url: string, onProgress?: Function): Promise<Uint8Array>, loadFile(file: string | Blob | ArrayBufferLike | Uint8Array): Promise<Uint8Array>, checksOutputLocation?: boolean }} Platform */

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

class KilnSessionHandler {
  constructor(instance, native) {
    this.instance = instance;
    this.native = native;
    this.inputMetadata = Object.freeze(native.inputMetadata());
    this.outputMetadata = Object.freeze(native.outputMetadata());
    this.inputNames = Object.freeze(this.inputMetadata.map((m) => m.name));
    this.outputNames = Object.freeze(this.outputMetadata.map((m) => m.name));
    this.queue = Promise.resolve();
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

  async runNow(feeds, fetches, options) {
    if (!this.native) throw new Error('cannot run inference. the session has been released.');
    if (this.instance.dead) {
      throw new Error('cannot run inference. kiln hit an internal error in an earlier call; create the session again.');
    }
    const inputs = [];
    for (const [name, tensor] of Object.entries(feeds)) {
      if (this.inputNames.indexOf(name) === -1) throw new Error(`invalid input '${name}'`);
      inputs.push([name, ...encode(tensor, `input "${name}"`)]);
    }
    const names = Object.keys(fetches);
    for (const name of names) {
      if (this.outputNames.indexOf(name) === -1) throw new Error(`invalid output '${name}'`);
      const pre = fetches[name];
      if (pre) encode(pre, `output "${name}"`, true);
    }
    validateRunOptions(options);
    let results;
    try {
      results = this.native.run(inputs, names);
    } catch (e) {
      if (isTrap(e)) {
        this.instance.dead = true;
        throw new Error(
          `failed to call OrtRun(). ERROR_CODE: 6, ERROR_MESSAGE: kiln hit an internal error (wasm trap: ${e.message}); ` +
            'this session can no longer run, create it again',
        );
      }
      throw asError(e);
    }
    const out = {};
    for (const [name, type, dims, data] of results) {
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
function encode(tensor, what, isOutput = false) {
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

/** Downloads a URL, calling onProgress({ loaded, total }) as bytes arrive (total: 0 when the server does not say). */
export async function fetchWithProgress(url, onProgress, what = 'model') {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`failed to load ${what}: ${url} (HTTP ${response.status})`);
  const total = Number(response.headers.get('Content-Length')) || 0;
  if (!onProgress || !response.body) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    onProgress?.({ loaded: bytes.length, total: total || bytes.length });
    return bytes;
  }
  const reader = response.body.getReader();
  let buffer = new Uint8Array(total || 1 << 20);
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (loaded + value.length > buffer.length) {
      const grown = new Uint8Array(Math.max(buffer.length * 2, loaded + value.length));
      grown.set(buffer.subarray(0, loaded));
      buffer = grown;
    }
    buffer.set(value, loaded);
    loaded += value.length;
    onProgress({ loaded, total });
  }
  return loaded === buffer.length ? buffer : buffer.slice(0, loaded);
}

const SRI_ALGORITHMS = { sha256: 'SHA-256', sha384: 'SHA-384', sha512: 'SHA-512' };

/**
 * Checks bytes against a Subresource Integrity string (`'sha256-<base64>'`, several space-separated hashes allowed:
 * any one matching passes, as in browsers).
 */
export async function checkIntegrity(bytes, integrity) {
  const wanted = String(integrity)
    .trim()
    .split(/\s+/)
    .map((h) => /^(sha256|sha384|sha512)-([A-Za-z0-9+/=_-]+)(\?.*)?$/.exec(h))
    .filter(Boolean);
  if (wanted.length === 0) throw new TypeError(`unsupported integrity value: ${integrity} (expected sha256-, sha384- or sha512-<base64>)`);
  const got = [];
  for (const [, alg, hash] of wanted) {
    const digest = new Uint8Array(await globalThis.crypto.subtle.digest(SRI_ALGORITHMS[alg], bytes));
    let binary = '';
    for (const b of digest) binary += String.fromCharCode(b);
    const b64 = btoa(binary);
    if (b64 === hash.replace(/-/g, '+').replace(/_/g, '/')) return;
    got.push(`${alg}-${b64}`);
  }
  throw new Error(`the model does not match its integrity value: expected ${integrity}, got ${got.join(' ')}`);
}

/** Makes the backend for one platform and registers it under onnxruntime-web's names. */
export function registerKiln(/** @type {Platform} */ platform) {
  let instance = null; // { exports, dead }
  let generation = 0;
  const wasmInstance = async () => {
    if (!instance || instance.dead) instance = { exports: await platform.loadWasm(generation++), dead: false };
    return instance;
  };

  const backend = {
    async init() {
      await wasmInstance();
    },
    async createInferenceSessionHandler(pathOrBuffer, options = {}) {
      // kiln-web's additions: onProgress({ loaded, total }) while a model URL or file loads; integrity ('sha256-...')
      const onProgress = typeof options.onProgress === 'function' ? options.onProgress : undefined;
      const model = typeof pathOrBuffer === 'string' ? await platform.loadModel(pathOrBuffer, onProgress) : pathOrBuffer;
      if (options.integrity !== undefined) await checkIntegrity(model, options.integrity);
      const eps = (options.executionProviders ?? []).map((ep) => (typeof ep === 'string' ? ep : ep.name));
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
      const externalData = [];
      for (const entry of options.externalData ?? []) {
        const path = typeof entry === 'string' ? entry : entry.path;
        const data = await platform.loadFile(typeof entry === 'string' ? entry : entry.data);
        externalData.push([path, data]);
      }
      const level = options.graphOptimizationLevel ?? 'all';
      const wasm = await wasmInstance();
      try {
        const native = wasm.exports.KilnSession.load(model, {
          executionProviders: eps,
          graphOptimizationLevel: level,
          freeDimensionOverrides: freeDims,
          externalData,
        });
        const handler = new KilnSessionHandler(wasm, native);
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
  // WebGPU is not in kiln's wasm build yet: asking for it warns and falls back like an unavailable backend.
  const webgpu = {
    async init() {
      throw new Error('WebGPU is not available in this build of kiln-web yet.');
    },
    async createInferenceSessionHandler() {
      throw new Error('WebGPU is not available in this build of kiln-web yet.');
    },
  };
  registerBackend('webgpu', webgpu, 5);
  registerBackend('cpu', backend, 10);
  registerBackend('wasm', backend, 10);
  Object.defineProperty(env.versions, 'web', { value: env.versions.common, enumerable: true });
  Object.defineProperty(env.versions, 'kiln', { value: KILN_WEB_VERSION, enumerable: true });
}

export { ort };
