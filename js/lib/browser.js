// kiln-web for browsers and Web Workers (and bundlers): the .wasm is fetched once with streaming compilation, from
// env.wasm.wasmBinary, env.wasm.wasmPaths (a prefix or { wasm }) or beside dist/kiln_js.js.
import init from '../dist/kiln_js.js';
import * as glue from '../dist/kiln_js.js';
import { env } from '../dist/onnxruntime-common/index.js';
import { fetchBlobWithProgress, fetchWithProgress, ort, registerCustomOp, registerKiln } from './core.js';

const WASM_NAME = 'kiln_js_bg.wasm';

const { modelFromTokenizerJson, decoderModelFromTokenizerJson, kilnWasmMemoryBytes } = registerKiln({
  checksOutputLocation: true,
  webgpu: true,
  async loadWasm(generation) {
    const { wasmBinary, wasmPaths } = env.wasm;
    let source;
    if (wasmBinary) source = wasmBinary;
    else if (typeof wasmPaths === 'string') source = new URL(WASM_NAME, new URL(wasmPaths, globalThis.location?.href));
    else if (wasmPaths?.wasm) source = wasmPaths.wasm;
    else source = new URL(`../dist/${WASM_NAME}`, import.meta.url);
    // after a wasm trap: a fresh copy of the glue module, hence a fresh instance
    const g = generation === 0 ? glue : await import(new URL(`../dist/kiln_js.js?instance=${generation}`, import.meta.url).href);
    await (generation === 0 ? init : g.default)({ module_or_path: source });
    return g;
  },
  loadModel: (url, onProgress) => fetchWithProgress(url, onProgress),
  // (onProgress: for a URL; core.js counts bytes and Blobs)
  async loadFile(file, onProgress) {
    if (file instanceof Uint8Array) return file;
    if (file instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && file instanceof SharedArrayBuffer)) {
      return new Uint8Array(file);
    }
    if (typeof Blob !== 'undefined' && file instanceof Blob) return new Uint8Array(await file.arrayBuffer());
    return fetchWithProgress(file, onProgress, 'external data file');
  },
  // 'webgpu': the model and its external data read a range at a time: `{ read(offset, length) =>
  // Promise<Uint8Array>, size }` (kiln streams large weights into GPU buffers; integrity hashes it a chunk at a time); a URL is fetched into a Blob,
  // whose bytes stay outside wasm memory
  async openFile(file, onProgress, what = 'external data file') {
    const ofBytes = (u8) => ({ read: async (offset, length) => u8.subarray(offset, offset + length), size: u8.length });
    if (file instanceof Uint8Array) return ofBytes(file);
    if (file instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && file instanceof SharedArrayBuffer)) {
      return ofBytes(new Uint8Array(file));
    }
    const blob = typeof Blob !== 'undefined' && file instanceof Blob ? file : await fetchBlobWithProgress(file, onProgress, what);
    return {
      read: async (offset, length) => new Uint8Array(await blob.slice(offset, offset + length).arrayBuffer()),
      size: blob.size,
    };
  },
});


export * from '../dist/onnxruntime-common/index.js';
export { registerCustomOp, modelFromTokenizerJson, decoderModelFromTokenizerJson, kilnWasmMemoryBytes };
export default ort;
