// kiln-web's API is onnxruntime-web's: onnxruntime-common 1.30's declarations, unchanged.
export * from './dist/onnxruntime-common/index.js';
import * as ort from './dist/onnxruntime-common/index.js';
export default ort;
