"""Reference sentence embeddings for the tokenizer → all-MiniLM-L6-v2 chain test: Python `tokenizers` + onnxruntime on
../shared/models/all-minilm-l6-v2/onnx/model_quantized.onnx, mean pooling over the attention mask, L2 normalised.

    .venv/bin/python ops/tests/data/tokenizer/make_minilm_reference.py
"""

import json
import pathlib

import numpy as np
import onnxruntime as ort
import tokenizers

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[3]
MODEL = REPO.parent / "shared/models/all-minilm-l6-v2/onnx/model_quantized.onnx"

SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted to a vector.",
    "The quick brown fox jumps over the lazy dog.",
    "A local-first app needs text in and text out.",
    "Crème brûlée à la carte, s'il vous plaît.",
    "你好，世界！ 日本語のテキスト 한국어",
    "I love pizza 🍕 and 👨\u200d👩\u200d👧\u200d👦",
    "def hello(name):\n    return f'Hello, {name}!'",
    "",
    "word " * 200,
]


def main():
    tok = tokenizers.Tokenizer.from_file(str(HERE / "minilm" / "tokenizer.json"))
    encs = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (hidden,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    emb = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    out = {
        "model": "all-minilm-l6-v2/onnx/model_quantized.onnx",
        "onnxruntime": ort.__version__,
        "tokenizers": tokenizers.__version__,
        "sentences": SENTENCES,
        "input_ids": ids.tolist(),
        "embeddings": emb.astype(float).round(7).tolist(),
    }
    (HERE / "minilm_embeddings.json").write_text(json.dumps(out, ensure_ascii=True) + "\n")
    print(f"{len(SENTENCES)} sentences, ids {ids.shape}, embeddings {emb.shape}")


if __name__ == "__main__":
    main()
