// kiln-web for Node (20+): the same wasm-bindgen glue as browsers, instantiated from the .wasm file; model and
// external-data paths are read from the file system like onnxruntime-web does in Node.
import { readFile } from 'node:fs/promises';
import * as glue from '../dist/kiln_js.js';
import { env } from '../dist/onnxruntime-common/index.js';
import { fetchWithProgress, ort, registerCustomOp, registerKiln } from './core.js';

// a file read whole: one progress call once it is read
async function readFileWithProgress(file, onProgress) {
  const bytes = new Uint8Array(await readFile(file));
  onProgress?.({ loaded: bytes.length, total: bytes.length });
  return bytes;
}

const { modelFromTokenizerJson, decoderModelFromTokenizerJson } = registerKiln({
  async loadWasm(generation) {
    const { wasmBinary, wasmPaths } = env.wasm;
    let bytes;
    if (wasmBinary) bytes = wasmBinary;
    else if (typeof wasmPaths === 'string') bytes = await readFile(new URL('kiln_js_bg.wasm', new URL(wasmPaths, `file://${process.cwd()}/`)));
    else if (wasmPaths?.wasm) bytes = await readFile(wasmPaths.wasm);
    else bytes = await readFile(new URL('../dist/kiln_js_bg.wasm', import.meta.url));
    // after a wasm trap: a fresh copy of the glue module, hence a fresh instance
    const g = generation === 0 ? glue : await import(new URL(`../dist/kiln_js.js?instance=${generation}`, import.meta.url).href);
    g.initSync({ module: await WebAssembly.compile(bytes) });
    return g;
  },
  // a path, or an http(s) URL (downloaded with fetch)
  async loadModel(pathOrUrl, onProgress) {
    if (/^https?:\/\//.test(pathOrUrl)) return fetchWithProgress(pathOrUrl, onProgress);
    return readFileWithProgress(pathOrUrl, onProgress);
  },
  // (onProgress: for a URL or a path; core.js counts bytes and Blobs)
  async loadFile(file, onProgress) {
    if (typeof file === 'string') {
      if (/^https?:\/\//.test(file)) return fetchWithProgress(file, onProgress, 'external data file');
      return readFileWithProgress(file, onProgress);
    }
    if (file instanceof Uint8Array) return file;
    if (file instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && file instanceof SharedArrayBuffer)) {
      return new Uint8Array(file);
    }
    if (typeof Blob !== 'undefined' && file instanceof Blob) return new Uint8Array(await file.arrayBuffer());
    if (file instanceof URL) return readFileWithProgress(file, onProgress);
    throw new TypeError('unsupported external data');
  },
});

export * from '../dist/onnxruntime-common/index.js';
export { registerCustomOp, modelFromTokenizerJson, decoderModelFromTokenizerJson };
export default ort;
