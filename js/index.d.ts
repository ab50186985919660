// kiln-web's API is onnxruntime-web's: onnxruntime-common 1.30's declarations, unchanged, plus kiln-web's additions
// (custom operators computed in JavaScript, the tokenizer model helpers). On 'webgpu', onnxruntime-common's GPU IO
// declarations hold as declared: `preferredOutputLocation: 'gpu-buffer'` gives `location: 'gpu-buffer'` tensors
// (`gpuBuffer`, `getData()`, `dispose()`), and `Tensor.fromGpuBuffer` tensors are accepted as feeds (buffers made on
// `await env.webgpu.device`; see docs/MIGRATING.md for kiln-web's requirements).
export * from './dist/onnxruntime-common/index.js';
import * as ort from './dist/onnxruntime-common/index.js';
export default ort;

/** An output of a custom operator: its type, or its type and dims (a number: fixed; a string, null or -1: dynamic). */
export type CustomOpOutput = ort.Tensor.Type | { type?: ort.Tensor.Type; dims?: ReadonlyArray<number | string | null> };

/** A node attribute as a custom operator sees it. */
export type CustomOpAttribute = number | string | number[] | string[] | ort.Tensor;

/**
 * A custom operator: kiln calls `compute` during `run` for every node of (`domain`, `opType`), with the node's
 * inputs as CPU tensors and its attributes. It returns the outputs (a Tensor, an array in the node's output order,
 * or a record by output name), or a Promise of them; their types and dims are what the model gets. A throw or a
 * rejection fails that run (the session stays usable). The element type and rank of each output must be known when
 * the model loads: from `outputs`, else from the model's value_info.
 */
export interface CustomOp {
  /** '' or 'ai.onnx' for the default domain. */
  domain?: string;
  opType: string;
  /** Expected input types, checked before compute is called. */
  inputs?: ReadonlyArray<ort.Tensor.Type | { type?: ort.Tensor.Type }>;
  outputs?: ReadonlyArray<CustomOpOutput>;
  compute(
    inputs: ort.Tensor[],
    attributes: Record<string, CustomOpAttribute>,
  ): ort.Tensor | ort.Tensor[] | Record<string, ort.Tensor> | Promise<ort.Tensor | ort.Tensor[] | Record<string, ort.Tensor>>;
}

declare module './dist/onnxruntime-common/index.js' {
  namespace InferenceSession {
    interface SessionOptions {
      /** kiln-web: custom operators for this session (they override registerCustomOp's and the built-in ones). */
      customOps?: readonly CustomOp[];
      /**
       * kiln-web: progress of the model's and its external data's downloads as one { loaded, total } (loaded never
       * decreases; total: the sizes known so far; the last call has loaded === total).
       */
      onProgress?: (progress: { loaded: number; total: number }) => void;
      /** kiln-web: Subresource Integrity of the model bytes ('sha256-...'). */
      integrity?: string;
    }
  }
}

/** Registers a custom operator for every session created afterwards; returns a function that unregisters it. */
export function registerCustomOp(op: CustomOp): () => void;
/** kiln-web (browsers): the bytes of kiln's wasm memory (`WebAssembly.Memory.buffer.byteLength`). */
export function kilnWasmMemoryBytes(): Promise<number>;

type Json = string | Uint8Array | ArrayBuffer | object;

/**
 * An ONNX model around kiln's built-in ai.onnx.contrib HfJsonTokenizer: input `input_text` (string [N]) → outputs
 * `input_ids` and `attention_mask` (int64 [N, L], right-padded).
 */
export function modelFromTokenizerJson(tokenizerJson: Json, tokenizerConfigJson?: Json): Promise<Uint8Array>;

/** The decoder: input `ids` (int64 [N, L]) → output `text` (string [N]). */
export function decoderModelFromTokenizerJson(
  tokenizerJson: Json,
  tokenizerConfigJson?: Json,
  options?: { skipSpecialTokens?: boolean },
): Promise<Uint8Array>;
