// An app written for onnxruntime-web; the Vite config in test/browser.mjs aliases 'onnxruntime-web' to kiln-web.
import * as ort from 'onnxruntime-web';
import { app } from '../browser/app.js';

window.mainThread = app(ort, '/fixtures/tiny-llama/onnx_optimum/model.onnx').catch((e) => ({ failure: String((e && e.stack) || e) }));
