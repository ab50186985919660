// Comparing the records of the parity suite's two runs (onnxruntime-web@1.30.0 and kiln-web): metadata and messages
// exactly, numbers within each record's tolerance. Used by scripts/test.mjs (Node) and test/browser.mjs (Chromium).

// Differences known and tracked on kiln's side: reported on every run, not failures. Keep this list short.
export const KNOWN = {
  'types no shape': "kiln refuses an input declared without a shape (it needs the rank); onnxruntime accepts any rank",
  'run error: token id out of range':
    "kiln reports the out-of-range Gather index as a run error (ERROR_CODE 6, RUNTIME_EXCEPTION); onnxruntime " +
    'reports INVALID_ARGUMENT (2)',
};

// Where onnxruntime-web itself behaves differently in a browser than in Node, per execution provider: known there,
// in addition to KNOWN. Each entry says what onnxruntime-web 1.30.0 does.
export const KNOWN_BROWSER = {
  wasm: {
    'run error: gpu-buffer feed':
      "onnxruntime-web's browser build (it has WebGPU compiled in) takes a 'gpu-buffer' feed on a 'wasm' session " +
      'without an error; kiln-web rejects it with the message onnxruntime-web gives in Node',
  },
  webgpu: {
    // kiln keeps these types as one 32-bit word per element on the GPU (int64 as int32, uint8 as int32, bool as
    // float32 0/1); onnxruntime-web's WebGPU EP keeps int64 as 8 bytes and uint8 / bool as 1 byte. getData(), feeding
    // the tensor back and every other record of these outputs are equal; only an app reading tensor.gpuBuffer's bytes
    // itself sees the difference (docs/MIGRATING.md)
    'gpu-buffer int64 output': "kiln's GPU layout of int64 is one int32 word per element (onnxruntime-web: 8 bytes)",
    'gpu-buffer uint8 output': "kiln's GPU layout of uint8 is one int32 word per element (onnxruntime-web: 1 byte)",
    'gpu-buffer bool output': "kiln's GPU layout of bool is one float32 word (0.0 / 1.0) per element (onnxruntime-web: 1 byte)",
  },
};
for (const ep of Object.keys(KNOWN_BROWSER)) {
  KNOWN_BROWSER[ep] = {
    'concurrent next tokens':
      "onnxruntime-web in a browser rejects a run while another is in flight on the session; kiln-web queues them " +
      '(in Node onnxruntime-web queues them too, and the records are equal there)',
    ...KNOWN_BROWSER[ep],
  };
}

export function compare(a, b, tol, where, diffs) {
  if (typeof a === 'number' && typeof b === 'number' && tol) {
    const ok = (Number.isNaN(a) && Number.isNaN(b)) || a === b || Math.abs(a - b) <= (tol.atol ?? 0) + (tol.rtol ?? 0) * Math.abs(b);
    if (!ok) diffs.push(`${where}: ${a} vs ${b}`);
  } else if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) diffs.push(`${where}: length ${a.length} vs ${b.length}`);
    else a.forEach((x, i) => compare(x, b[i], tol, `${where}[${i}]`, diffs));
  } else if (a && b && typeof a === 'object' && typeof b === 'object') {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    for (const k of keys) {
      if (!(k in a) || !(k in b)) diffs.push(`${where}.${k}: only in ${k in a ? 'the first' : 'the second'}`);
      else compare(a[k], b[k], tol, `${where}.${k}`, diffs);
    }
  } else if (a !== b) {
    diffs.push(`${where}: ${JSON.stringify(a)} vs ${JSON.stringify(b)}`);
  }
}

/**
 * kiln-web's records against onnxruntime-web's. Returns { same, lines, failed }: `lines` the KNOWN and DIFF reports
 * (a KNOWN entry whose records are equal is not reported), `failed` whether any difference is not in `known`.
 */
export function compareRecords(ortRecords, kilnRecords, known = KNOWN) {
  const lines = [];
  let same = 0;
  let failed = false;
  for (const key of new Set([...Object.keys(ortRecords), ...Object.keys(kilnRecords)])) {
    const o = ortRecords[key];
    const k = kilnRecords[key];
    if (!o || !k) {
      lines.push(`DIFF ${key}: recorded only on ${o ? 'onnxruntime-web' : 'kiln-web'}`);
      failed = true;
      continue;
    }
    const diffs = [];
    compare(k.value, o.value, o.tol, key, diffs);
    if (diffs.length && known[key]) {
      lines.push(`KNOWN ${key}: ${known[key]}\n  ${diffs.slice(0, 2).join('\n  ')}`);
    } else if (diffs.length) {
      failed = true;
      lines.push(`DIFF ${key} (kiln-web vs onnxruntime-web):\n  ${diffs.slice(0, 8).join('\n  ')}${diffs.length > 8 ? `\n  ... ${diffs.length - 8} more` : ''}`);
    } else same++;
  }
  return { same, lines, failed };
}
