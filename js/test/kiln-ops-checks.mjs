// kiln-web's tokenizer operators and JavaScript custom operators: checks shared by Node (test/kiln-ops.mjs) and
// headless Chromium (test/browser/kiln-ops.html through test/browser.mjs). Each check takes the kiln-web namespace
// and a loader ({ text(path), bytes(path) } for files under ops/tests/data/tokenizer/ ('tok/...') and js/test/data/
// ('data/...')), and throws on any difference.
//
// Tokenizers: SmolLM2's and all-MiniLM-L6-v2's tokenizer.json through modelFromTokenizerJson /
// decoderModelFromTokenizerJson, against the Python `tokenizers` package's ids, masks and decodings of the 250-string
// corpus (ops/tests/data/tokenizer/refs_*.json, written by make_tokenizer_refs.py). Custom operators: the toy models
// of test/data (make_custom_op_models.py), with references computed here in plain JavaScript.

function fail(what, got, want) {
  throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
}
function eq(got, want, what) {
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) fail(what, got, want);
}
function close(got, want, what) {
  const g = Array.from(got);
  if (g.length !== want.length || g.some((v, i) => Math.abs(v - want[i]) > 1e-6 * Math.max(1, Math.abs(want[i])))) fail(what, g, want);
}
async function rejects(promise, pattern, what) {
  try {
    await promise;
  } catch (e) {
    if (!(e instanceof Error)) throw new Error(`${what}: rejected with a non-Error: ${e}`);
    if (!pattern.test(e.message)) throw new Error(`${what}: the message ${JSON.stringify(e.message)} does not match ${pattern}`);
    return e;
  }
  throw new Error(`${what}: no error`);
}
const nums = (a) => Array.from(a, Number);

// ---- tokenizers ---------------------------------------------------------------------------------------------------

const PAD = { smollm2: 2, minilm: 0 }; // tokenizer_config's pad_token <|im_end|>; tokenizer.json's padding [PAD]

async function tokenizerCheck(ort, load, name) {
  const json = await load.text(`tok/${name}/tokenizer.json`);
  const config = await load.text(`tok/${name}/tokenizer_config.json`);
  const corpus = JSON.parse(await load.text('tok/corpus.json'));
  const refs = JSON.parse(await load.text(`tok/refs_${name}.json`)).rows;
  eq(corpus.length, refs.length, 'corpus vs references');
  if (corpus.length < 200) throw new Error(`the corpus has only ${corpus.length} strings`);
  const session = await ort.InferenceSession.create(await ort.modelFromTokenizerJson(json, config));
  eq(session.inputNames, ['input_text'], 'inputs');
  eq(session.outputNames, ['input_ids', 'attention_mask'], 'outputs');
  // one string at a time: Python's encode(text)
  for (let i = 0; i < corpus.length; i++) {
    const out = await session.run({ input_text: new ort.Tensor('string', [corpus[i]], [1]) });
    const what = `${name} #${i} ${JSON.stringify(corpus[i]).slice(0, 60)}`;
    eq(out.input_ids.type, 'int64', `${what}: type`);
    eq(Array.from(out.input_ids.dims), [1, refs[i].ids.length], `${what}: dims`);
    eq(nums(out.input_ids.data), refs[i].ids, `${what}: ids`);
    eq(nums(out.attention_mask.data), refs[i].attention_mask, `${what}: mask`);
  }
  // the whole corpus as one batch, right-padded
  const out = await session.run({ input_text: new ort.Tensor('string', corpus, [corpus.length]) });
  const len = Math.max(...refs.map((r) => r.ids.length));
  eq(Array.from(out.input_ids.dims), [corpus.length, len], `${name} batch dims`);
  const ids = nums(out.input_ids.data);
  const mask = nums(out.attention_mask.data);
  refs.forEach((r, i) => {
    const n = r.ids.length;
    eq(ids.slice(i * len, i * len + n), r.ids, `${name} batch row ${i}`);
    eq(ids.slice(i * len + n, (i + 1) * len), new Array(len - n).fill(PAD[name]), `${name} batch row ${i} padding`);
    eq(mask.slice(i * len, (i + 1) * len), [...r.attention_mask, ...new Array(len - n).fill(0)], `${name} batch mask ${i}`);
  });
  await session.release();
  // decoding, keeping and skipping special tokens
  for (const skip of [false, true]) {
    const dec = await ort.InferenceSession.create(await ort.decoderModelFromTokenizerJson(json, config, { skipSpecialTokens: skip }));
    for (let i = 0; i < refs.length; i++) {
      const ids = new ort.Tensor('int64', BigInt64Array.from(refs[i].ids.map(BigInt)), [1, refs[i].ids.length]);
      const text = (await dec.run({ ids })).text;
      eq(text.type, 'string', 'decoded type');
      eq(Array.from(text.data), [skip ? refs[i].decoded_skip : refs[i].decoded], `${name} decode${skip ? ' (skip special)' : ''} #${i}`);
    }
    await dec.release();
  }
  return `${corpus.length} strings: ids, masks, padded batch and decodings equal Python tokenizers'`;
}

export const tokenizerChecks = {
  'tokenizer op: SmolLM2 tokenizer.json vs Python tokenizers': (ort, load) => tokenizerCheck(ort, load, 'smollm2'),
  'tokenizer op: all-MiniLM-L6-v2 tokenizer.json vs Python tokenizers': (ort, load) => tokenizerCheck(ort, load, 'minilm'),
  'tokenizer op: a malformed tokenizer.json is an error naming it; a number input a run error': async (ort, load) => {
    await rejects(ort.modelFromTokenizerJson('{"not": "a tokenizer"}'), /tokenizer\.json/, 'malformed tokenizer.json');
    const session = await ort.InferenceSession.create(await ort.modelFromTokenizerJson(await load.text('tok/minilm/tokenizer.json')));
    await rejects(
      session.run({ input_text: new ort.Tensor('int64', new BigInt64Array(1), [1]) }),
      /input_text|string/,
      'int64 input',
    );
    // Python tokenizers: 'hello' → [101, 7592, 102], padded to 128 (MiniLM's tokenizer.json pads to a fixed length)
    const hello = nums((await session.run({ input_text: new ort.Tensor('string', ['hello'], [1]) })).input_ids.data);
    eq(hello, [101, 7592, 102, ...new Array(125).fill(0)], 'after the error');
    return 'ok';
  },
};

// ---- custom operators ---------------------------------------------------------------------------------------------

const BIAS = [1, -1, 0.5];
const reference = (x, factor = 2.5) => Array.from(x, (v, i) => v * factor + BIAS[i % 3]);
const x23 = (ort, values = [1, 2, 3, 4, 5, 6]) => new ort.Tensor('float32', Float32Array.from(values), [values.length / 3, 3]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function scaleOp(ort, extra = {}) {
  return {
    domain: 'test.kiln',
    opType: 'Scale',
    inputs: ['float32'],
    compute([x], attributes) {
      if (x.data[0] < 0) throw new Error('negative input, refused by the test op');
      return new ort.Tensor('float32', x.data.map((v) => v * attributes.factor), x.dims);
    },
    ...extra,
  };
}

const RUN_ERROR = /^failed to call OrtRun\(\)\. ERROR_CODE: 6, ERROR_MESSAGE: custom operator test\.kiln\/Scale \(node `scale_node`\): /;

export const customOpChecks = {
  'custom op: a JS Scale op runs inside a model; attributes arrive as plain values': async (ort, load) => {
    let seen;
    const op = scaleOp(ort, {
      compute(inputs, attributes) {
        seen = attributes;
        if (!(inputs[0] instanceof ort.Tensor)) throw new Error('inputs are not Tensors');
        return new ort.Tensor('float32', inputs[0].data.map((v) => v * attributes.factor), inputs[0].dims);
      },
    });
    const s = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [op] });
    for (const values of [[1, 2, 3], [0.5, -2, 7, 1, 1, 1, 9, 8, 7]]) {
      const { z } = await s.run({ x: x23(ort, values) });
      eq(Array.from(z.dims), [values.length / 3, 3], 'dims');
      close(z.data, reference(values), 'z');
    }
    eq(seen, { factor: 2.5, label: 'scale' }, 'attributes');
    await s.release();
    return 'ok';
  },
  'custom op: async compute (a Promise, resolved later)': async (ort, load) => {
    const op = scaleOp(ort, {
      async compute([x], { factor }) {
        await sleep(5);
        return { y: new ort.Tensor('float32', x.data.map((v) => v * factor), x.dims) };
      },
    });
    const s = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [op] });
    // concurrent runs queue; each gets its own answer
    const inputs = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 1, 2, 3]];
    const outs = await Promise.all(inputs.map((v) => s.run({ x: x23(ort, v) })));
    outs.forEach((o, i) => close(o.z.data, reference(inputs[i]), `run ${i}`));
    await s.release();
    return 'ok';
  },
  'custom op: a throwing or rejecting compute is a clean run error; the session keeps working': async (ort, load) => {
    const s = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [scaleOp(ort)] });
    const e = await rejects(s.run({ x: x23(ort, [-1, 0, 1]) }), RUN_ERROR, 'throwing compute');
    if (!/negative input, refused by the test op$/.test(e.message)) throw new Error(e.message);
    close((await s.run({ x: x23(ort, [1, 0, 1]) })).z.data, reference([1, 0, 1]), 'after a throw');
    const r = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), {
      customOps: [scaleOp(ort, { compute: async () => Promise.reject(new Error('async failure')) })],
    });
    await rejects(r.run({ x: x23(ort, [1, 2, 3]) }), /async failure$/, 'rejecting compute');
    await rejects(r.run({ x: x23(ort, [1, 2, 3]) }), /async failure$/, 'rejecting compute, again');
    close((await s.run({ x: x23(ort, [3, 2, 1]) })).z.data, reference([3, 2, 1]), 'the other session');
    await s.release();
    await r.release();
    return 'ok';
  },
  'custom op: outputs that do not fit the node are run errors': async (ort, load) => {
    const cases = [
      [() => new ort.Tensor('int32', new Int32Array(3), [1, 3]), /is I32, the model expects F32/],
      [() => new ort.Tensor('float32', new Float32Array(3), [3]), /the model expects rank 2/],
      [() => new ort.Tensor('float32', new Float32Array(4), [1, 4]), /expects 3 at axis 1/],
      [() => [], /returned 0 output\(s\), the node has 1 \(y\)/],
      [() => 42, /compute must return a Tensor/],
      [() => ({ nope: 1 }), /compute returned no output 'y'/],
    ];
    for (const [compute, pattern] of cases) {
      const s = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [scaleOp(ort, { compute })] });
      await rejects(s.run({ x: x23(ort, [1, 2, 3]) }), pattern, String(pattern));
      await s.release();
    }
    // declared input types are checked before compute runs
    const s = await ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [scaleOp(ort, { inputs: ['int64'] })] });
    await rejects(s.run({ x: x23(ort, [1, 2, 3]) }), /input 0 is float32, the operator declares int64/, 'input types');
    return 'ok';
  },
  'custom op: output types from value_info or the op\'s outputs; an unregistered op is a load error': async (ort, load) => {
    const noinfo = await load.bytes('data/scale_noinfo.onnx');
    await rejects(ort.InferenceSession.create(noinfo, { customOps: [scaleOp(ort)] }), /scale_node.*declare/, 'no type for y');
    const s = await ort.InferenceSession.create(noinfo, { customOps: [scaleOp(ort, { outputs: [{ type: 'float32', dims: ['n', 3] }] })] });
    close((await s.run({ x: x23(ort, [1, 2, 3]) })).z.data, reference([1, 2, 3]), 'declared outputs');
    await s.release();
    await rejects(ort.InferenceSession.create(await load.bytes('data/scale.onnx')), /Scale.*not supported/, 'unregistered');
    await rejects(
      ort.InferenceSession.create(await load.bytes('data/scale.onnx'), { customOps: [{ domain: 'test.kiln', opType: 'Scale' }] }),
      /compute must be a function/,
      'no compute',
    );
    return 'ok';
  },
  'custom op: an output sized at run time (fresh symbols bound downstream)': async (ort, load) => {
    const repeat = {
      domain: 'test.kiln',
      opType: 'Repeat',
      compute([x], { times }) {
        const out = new Float32Array(x.data.length * times);
        for (let t = 0; t < times; t++) out.set(x.data, t * x.data.length);
        return [new ort.Tensor('float32', out, [out.length])];
      },
    };
    const s = await ort.InferenceSession.create(await load.bytes('data/repeat.onnx'), { customOps: [repeat] });
    for (const n of [2, 5]) {
      const x = Float32Array.from({ length: n }, (_, i) => i + 1);
      const out = await s.run({ x: new ort.Tensor('float32', x, [n]) });
      eq(nums(out.s.data), [3 * n], 's');
      close(out.total.data, [3 * x.reduce((a, b) => a + b, 0)], 'total');
    }
    return 'ok';
  },
  'custom op: an app overrides a built-in tokenizer op; registerCustomOp is global, customOps win': async (ort, load) => {
    const model = await ort.modelFromTokenizerJson(await load.text('tok/minilm/tokenizer.json'));
    const input_text = new ort.Tensor('string', ['hi', 'abc'], [2]);
    const builtin = await ort.InferenceSession.create(model);
    // Python tokenizers: 'hi' → [101, 7632, 102], 'abc' → [101, 5925, 102], padded to 128
    const real = await builtin.run({ input_text });
    eq(Array.from(real.input_ids.dims), [2, 128], 'built-in dims');
    const realIds = nums(real.input_ids.data);
    eq([realIds.slice(0, 4), realIds.slice(128, 132)], [[101, 7632, 102, 0], [101, 5925, 102, 0]], 'built-in ids');
    // the stand-in: ids = UTF-8 bytes, padded with 0
    const bytesTokenizer = (offset) => ({
      domain: 'ai.onnx.contrib',
      opType: 'HfJsonTokenizer',
      compute([text]) {
        const rows = text.data.map((t) => Array.from(new TextEncoder().encode(t)));
        const len = Math.max(...rows.map((r) => r.length));
        const ids = rows.flatMap((r) => [...r.map((b) => BigInt(b + offset)), ...new Array(len - r.length).fill(0n)]);
        const mask = rows.flatMap((r) => [...r.map(() => 1n), ...new Array(len - r.length).fill(0n)]);
        return { input_ids: new ort.Tensor('int64', BigInt64Array.from(ids), [rows.length, len]), attention_mask: new ort.Tensor('int64', BigInt64Array.from(mask), [rows.length, len]) };
      },
    });
    const s = await ort.InferenceSession.create(model, { customOps: [bytesTokenizer(0)] });
    const out = await s.run({ input_text });
    eq(nums(out.input_ids.data), [104, 105, 0, 97, 98, 99], 'overridden ids');
    eq(nums(out.attention_mask.data), [1, 1, 0, 1, 1, 1], 'overridden mask');
    const unregister = ort.registerCustomOp(bytesTokenizer(1000));
    try {
      const g = await ort.InferenceSession.create(model);
      eq(nums((await g.run({ input_text })).input_ids.data), [1104, 1105, 0, 1097, 1098, 1099], 'global registration');
      const o = await ort.InferenceSession.create(model, { customOps: [bytesTokenizer(0)] });
      eq(nums((await o.run({ input_text })).input_ids.data), [104, 105, 0, 97, 98, 99], 'session customOps win');
    } finally {
      unregister();
    }
    const back = await ort.InferenceSession.create(model);
    eq(nums((await back.run({ input_text })).input_ids.data), realIds, 'unregistered: the built-in again');
    return 'ok';
  },
};
