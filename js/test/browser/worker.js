// The app in a module Web Worker; `entry` is the package entry (kiln-web's lib/browser.js or onnxruntime-web's).
import { app } from './app.js';
import { fixtureChecks } from './fixtures.js';

const query = new URL(self.location.href).searchParams;
const entry = query.get('entry');
const ep = query.get('ep') ?? 'wasm';
try {
  const ort = await import(entry);
  const r = await app(ort, '/fixtures/tiny-llama/onnx_optimum/model.onnx', ep);
  if (query.get('fixtures') === '1') r.fixtures = await fixtureChecks(ort, ep);
  self.postMessage(r);
} catch (e) {
  self.postMessage({ failure: String((e && e.stack) || e) });
}
