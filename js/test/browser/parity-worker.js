// The parity suite in a module Web Worker: the page posts { entry, ep, skip }, the worker answers with runParity's result.
import { runParity } from './parity-runner.js';

self.onmessage = async (e) => {
  try {
    self.postMessage(await runParity(e.data));
  } catch (err) {
    self.postMessage({ failure: String((err && err.stack) || err) });
  }
};
