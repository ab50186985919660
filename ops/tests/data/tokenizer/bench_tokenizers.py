"""Encode throughput (MB/s of UTF-8 input) of the Python `tokenizers` package on corpus.json, to compare with kiln's
HfJsonTokenizer op (`cargo test --release -p kiln-ops --test tokenizer -- --ignored --nocapture throughput`).

    .venv/bin/python ops/tests/data/tokenizer/bench_tokenizers.py
"""

import json
import os
import pathlib
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[3]


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tokenizers

    texts = json.loads((HERE / "corpus.json").read_text())
    size = sum(len(t.encode("utf-8")) for t in texts)
    files = {
        "smollm2": HERE / "smollm2/tokenizer.json",
        "minilm": HERE / "minilm/tokenizer.json",
        "tiny_gpt2": REPO / "conformance/fixtures/tiny/tiny-gpt2/onnx_optimum/tokenizer.json",
    }
    reps = 5
    for name, path in files.items():
        tok = tokenizers.Tokenizer.from_file(str(path))
        tok.encode_batch(texts)
        t = time.perf_counter()
        for _ in range(reps):
            for s in texts:
                tok.encode(s)
        single = size * reps / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        for _ in range(reps):
            tok.encode_batch(texts)
        batch = size * reps / (time.perf_counter() - t) / 1e6
        print(f"{name}: {size} bytes; encode() per string {single:.2f} MB/s; "
              f"encode_batch {batch:.2f} MB/s (TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']})")


if __name__ == "__main__":
    main()
