"""Runs the tokenizer models kiln writes in onnxruntime with onnxruntime-extensions (PyPI `onnxruntime-extensions`)
and compares their outputs with the Python `tokenizers` references. Called by ops/tests/tokenizer.rs with a JSON list
of cases ({name, kind: encode | decode | decode_skip, model, refs}); prints one line per case, then a JSON report
{name: {loaded, error?, strings, equal}} as the last line.
"""

import json
import pathlib
import sys

import numpy as np
import onnxruntime as ort
import onnxruntime_extensions

HERE = pathlib.Path(__file__).resolve().parent


def main():
    cases = json.loads(pathlib.Path(sys.argv[1]).read_text())
    texts = json.loads((HERE / "corpus.json").read_text())
    report = {}
    for case in cases:
        refs = json.loads(pathlib.Path(case["refs"]).read_text())["rows"]
        opts = ort.SessionOptions()
        opts.register_custom_ops_library(onnxruntime_extensions.get_library_path())
        entry = {"loaded": False, "strings": 0, "equal": 0}
        report[case["name"]] = entry
        try:
            sess = ort.InferenceSession(case["model"], opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - the report says why
            entry["error"] = str(e).splitlines()[0][:300]
            print(f"{case['name']}: does not load in onnxruntime-extensions {onnxruntime_extensions.__version__}: "
                  f"{entry['error']}")
            continue
        entry["loaded"] = True
        inp = sess.get_inputs()[0].name
        first_diff = None
        for text, ref in zip(texts, refs):
            if case["kind"] == "encode" and case["name"] == "GPT2Tokenizer" and "<|im_" in text:
                continue
            if case["kind"] != "encode" and not ref["ids"]:
                # onnxruntime-extensions' BpeDecoder divides by the sequence length: empty ids crash the process.
                entry["skipped_empty"] = True
                continue
            entry["strings"] += 1
            try:
                if case["kind"] == "encode":
                    got = sess.run(None, {inp: np.array([text], dtype=object)})[0].reshape(-1).tolist()
                    want = ref["ids"]
                else:
                    ids = np.array([ref["ids"]], dtype=np.int64)
                    got = str(sess.run(None, {inp: ids})[0].reshape(-1)[0])
                    want = ref["decoded_skip"] if case["kind"] == "decode_skip" else ref["decoded"]
            except Exception as e:  # noqa: BLE001
                got, want = f"error: {str(e)[:200]}", None
            if got == want:
                entry["equal"] += 1
            elif first_diff is None:
                first_diff = text[:60]
        if first_diff is not None:
            entry["first_difference"] = first_diff
        print(f"{case['name']}: loads; {entry['equal']} of {entry['strings']} strings equal to Python tokenizers"
              + (f" (first difference: {first_diff!r})" if first_diff is not None else ""))
    print(json.dumps(report, ensure_ascii=True))


if __name__ == "__main__":
    main()
