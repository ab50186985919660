// The app in a module Web Worker; `entry` is the package entry (kiln-web's lib/browser.js or onnxruntime-web's).
import { app } from './app.js';

const entry = new URL(self.location.href).searchParams.get('entry');
try {
  const ort = await import(entry);
  self.postMessage(await app(ort, '/fixtures/tiny-llama/onnx_optimum/model.onnx'));
} catch (e) {
  self.postMessage({ failure: String((e && e.stack) || e) });
}
