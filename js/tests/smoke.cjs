// Node smoke test of kiln-js through wasm-bindgen's glue: load the tiny-llama fixture, prefill five tokens, check
// the greedy next token against onnxruntime's (examples/tests/data/tiny_greedy.json: 11,22,33,44,55 → 614).
//
//   cargo build --release -p kiln-js --target wasm32-unknown-unknown
//   wasm-bindgen --target nodejs --out-dir target/kiln-js-node target/wasm32-unknown-unknown/release/kiln_js.wasm
//   node js/tests/smoke.cjs target/kiln-js-node/kiln_js.js
const fs = require("node:fs");
const path = require("node:path");
const assert = require("node:assert");

async function main() {
  const kiln = require(path.resolve(process.argv[2]));
  const root = path.join(__dirname, "..", "..");
  const bytes = fs.readFileSync(path.join(root, "conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx"));
  console.log("kiln-js", kiln.version());
  console.log(kiln.loadCheck(bytes));
  assert.throws(() => kiln.loadCheck(new Uint8Array([1, 2, 3])), /INVALID_GRAPH|not a valid ONNX/);

  const session = await kiln.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  assert.deepStrictEqual(session.inputNames.slice(0, 3), ["input_ids", "attention_mask", "position_ids"]);
  const ids = [11n, 22n, 33n, 44n, 55n];
  const feeds = {
    input_ids: new kiln.Tensor("int64", BigInt64Array.from(ids), [1, 5]),
    attention_mask: new kiln.Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, 5]),
    // a plain object shaped like onnxruntime-web's Tensor works too
    position_ids: { type: "int64", data: BigInt64Array.from([0n, 1n, 2n, 3n, 4n]), dims: [1, 5] },
  };
  for (const name of session.inputNames.filter((n) => n.startsWith("past_key_values"))) {
    feeds[name] = new kiln.Tensor("float32", new Float32Array(0), [1, 2, 0, 16]);
  }
  const results = await session.run(feeds);
  const logits = results.logits;
  assert.strictEqual(logits.type, "float32");
  assert.deepStrictEqual(Array.from(logits.dims), [1, 5, 1000]);
  const last = logits.data.subarray(4 * 1000, 5 * 1000);
  let best = 0;
  for (let i = 1; i < last.length; i++) if (last[i] > last[best]) best = i;
  assert.strictEqual(best, 614, "greedy next token like onnxruntime");
  assert.deepStrictEqual(Array.from(results["present.0.key"].dims), [1, 2, 5, 16]);
  await assert.rejects(session.run({ input_ids: feeds.input_ids }), /missing input/);
  console.log("ok: next token", best, "logits", Array.from(logits.dims));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
