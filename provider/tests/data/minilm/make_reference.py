"""Reference data for provider/tests/minilm.rs: all-MiniLM-L6-v2 int8 (../shared/models/all-minilm-l6-v2, onnxruntime
quantize_dynamic QUInt8: DynamicQuantizeLinear, MatMulInteger, LayerNormalization, Erf, Softmax) on 8 sentences.

Token ids from the `tokenizers` package and the model's tokenizer.json (padded to the longest sentence); the
reference last_hidden_state from onnxruntime's CPU provider with its default session options. ONNX backend-test
layout: input_{0,1,2}.pb = input_ids, attention_mask, token_type_ids (int64 [8, 14]); output_0.pb = last_hidden_state
(float32 [8, 14, 384]).

    .venv/bin/python provider/tests/data/minilm/make_reference.py
"""

import pathlib

import numpy as np
import onnxruntime as ort
import tokenizers
from onnx import numpy_helper

HERE = pathlib.Path(__file__).resolve().parent
MODEL_DIR = HERE.parents[3].parent / "shared/models/all-minilm-l6-v2"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "Rust is a systems programming language focused on safety.",
    "How do I bake sourdough bread at home?",
    "The stock market fell sharply after the announcement.",
    "Quantization reduces model size with little loss of accuracy.",
    "She sells sea shells by the sea shore.",
    "Embeddings map sentences to vectors.",
]


def main():
    tok = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(SENTENCES)
    feeds = {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }
    sess = ort.InferenceSession(str(MODEL_DIR / "onnx/model_quantized.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = sess.run(None, feeds)
    for j, (name, value) in enumerate(feeds.items()):
        (HERE / f"input_{j}.pb").write_bytes(numpy_helper.from_array(value, name).SerializeToString())
    (HERE / "output_0.pb").write_bytes(numpy_helper.from_array(hidden, "last_hidden_state").SerializeToString())
    print(f"onnxruntime {ort.__version__}, tokenizers {tokenizers.__version__}: ids {feeds['input_ids'].shape}")


if __name__ == "__main__":
    main()
