//! The tokenizer ops (`ai.onnx.contrib` HfJsonTokenizer, HfJsonDecoder, GPT2Tokenizer, BpeDecoder) through a kiln
//! Session, against the Python `tokenizers` package on a corpus of 250 strings (`data/tokenizer/corpus.json`, written
//! with the references by `data/tokenizer/make_tokenizer_refs.py`) for SmolLM2's, all-MiniLM-L6-v2's and the tiny
//! fixtures' tokenizer.json; the tokenizer → all-MiniLM-L6-v2 → mean pooling chain against Python tokenizers +
//! onnxruntime (`make_minilm_reference.py`); onnxruntime-extensions loading the models kiln writes (`check_ortx.py`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_ops::tokenizer::{decoder_model_from_tokenizer_json, model_from_tokenizer_json, CONTRIB_DOMAIN};
use kiln_provider::blocking::Session;
use kiln_provider::{SessionOptions, Tensor};
use prost::Message;
use serde_json::Value;
use tract_onnx::pb;

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer").join(p)
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn corpus() -> Vec<String> {
    serde_json::from_str(&read(&data("corpus.json"))).expect("corpus.json")
}

/// (tokenizer.json, tokenizer_config.json) of a test tokenizer.
fn files(name: &str) -> (String, String) {
    let dir = match name {
        "smollm2" => data("smollm2"),
        "minilm" => data("minilm"),
        "tiny_gpt2" => repo("conformance/fixtures/tiny/tiny-gpt2/onnx_optimum"),
        other => panic!("no tokenizer {other}"),
    };
    (read(&dir.join("tokenizer.json")), read(&dir.join("tokenizer_config.json")))
}

struct Row {
    ids: Vec<i64>,
    mask: Vec<i64>,
    offsets: Vec<[i64; 2]>,
    decoded: String,
    decoded_skip: String,
}

fn refs(name: &str) -> Vec<Row> {
    let v: Value = serde_json::from_str(&read(&data(&format!("refs_{name}.json")))).expect("refs");
    let ints = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<i64>>();
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Row {
            ids: ints(&r["ids"]),
            mask: ints(&r["attention_mask"]),
            offsets: r["offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| [o[0].as_i64().unwrap(), o[1].as_i64().unwrap()])
                .collect(),
            decoded: r["decoded"].as_str().unwrap().to_string(),
            decoded_skip: r["decoded_skip"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn session(bytes: &[u8]) -> Session {
    Session::from_bytes(bytes, &SessionOptions::default()).expect("session")
}

fn strings(texts: &[String]) -> Tensor {
    Tensor::from_vec(&[texts.len()], texts.to_vec()).unwrap()
}

/// The encoder model with a third output, `offset_mapping`.
fn with_offsets(model: &[u8]) -> Vec<u8> {
    let mut m = pb::ModelProto::decode(model).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node[0].output.push("offset_mapping".into());
    let mut out = g.output[0].clone();
    out.name = "offset_mapping".into();
    g.output.push(out);
    m.encode_to_vec()
}

fn check_encode(name: &str) {
    let texts = corpus();
    let want = refs(name);
    let (json, config) = files(name);
    let model = with_offsets(&model_from_tokenizer_json(&json, &config).expect("model"));
    let s = session(&model);
    // One string at a time: exactly Python's `encode(text)`.
    for (text, w) in texts.iter().zip(&want) {
        let out = s.run([("input_text", strings(std::slice::from_ref(text)))]).expect("run");
        let ids = out.output("input_ids").unwrap();
        assert_eq!(ids.dims(), &[1, w.ids.len()], "{name}: {text:?}");
        assert_eq!(ids.to_vec::<i64>().unwrap(), w.ids, "{name}: ids of {text:?}");
        assert_eq!(out.output("attention_mask").unwrap().to_vec::<i64>().unwrap(), w.mask, "{name}: mask of {text:?}");
        let offsets = out.output("offset_mapping").unwrap();
        assert_eq!(offsets.dims(), &[1, w.ids.len(), 2]);
        let got: Vec<[i64; 2]> = offsets.to_vec::<i64>().unwrap().chunks(2).map(|c| [c[0], c[1]]).collect();
        assert_eq!(got, w.offsets, "{name}: offsets of {text:?}");
    }
    // The whole corpus as one batch: rows right-padded with the pad token, mask 0 there.
    let out = s.run([("input_text", strings(&texts))]).expect("run");
    let ids = out.output("input_ids").unwrap();
    let len = want.iter().map(|w| w.ids.len()).max().unwrap();
    assert_eq!(ids.dims(), &[texts.len(), len]);
    let ids = ids.to_vec::<i64>().unwrap();
    let mask = out.output("attention_mask").unwrap().to_vec::<i64>().unwrap();
    let pad = pad_id(name);
    for (r, w) in want.iter().enumerate() {
        let row = &ids[r * len..(r + 1) * len];
        assert_eq!(&row[..w.ids.len()], &w.ids[..], "{name}: batch row {r}");
        assert!(row[w.ids.len()..].iter().all(|&i| i == pad), "{name}: batch row {r} padding");
        let m = &mask[r * len..(r + 1) * len];
        assert_eq!(&m[..w.mask.len()], &w.mask[..]);
        assert!(m[w.mask.len()..].iter().all(|&x| x == 0));
    }
}

fn pad_id(name: &str) -> i64 {
    match name {
        "smollm2" | "tiny_gpt2" => 2, // tokenizer_config's pad_token <|im_end|>
        _ => 0,                       // tokenizer.json's padding: [PAD]
    }
}

fn check_decode(name: &str) {
    let texts = corpus();
    let want = refs(name);
    let (json, config) = files(name);
    let keep = session(&decoder_model_from_tokenizer_json(&json, &config, false).expect("model"));
    let skip = session(&decoder_model_from_tokenizer_json(&json, &config, true).expect("model"));
    let mut lossless = 0;
    for (text, w) in texts.iter().zip(&want) {
        let ids = Tensor::from_vec(&[1, w.ids.len()], w.ids.clone()).unwrap();
        let got = keep.run([("ids", ids.clone())]).expect("run").output("text").unwrap().to_vec::<String>().unwrap();
        assert_eq!(got, vec![w.decoded.clone()], "{name}: decode of {text:?}");
        let got = skip.run([("ids", ids)]).expect("run").output("text").unwrap().to_vec::<String>().unwrap();
        assert_eq!(got, vec![w.decoded_skip.clone()], "{name}: decode (skip special) of {text:?}");
        lossless += (got[0] == *text) as usize;
    }
    // Where Python's tokenizers round-trip a string (byte-level BPE: all but skipped special tokens and the control
    // bytes SmolLM2's vocabulary lacks), kiln does too.
    let python = texts.iter().zip(&want).filter(|(t, w)| w.decoded_skip == **t).count();
    assert_eq!(lossless, python, "{name}: round-trips");
    if name != "minilm" {
        let lossless_keep = texts.iter().zip(&want).filter(|(t, w)| w.decoded == **t).count();
        assert!(lossless_keep >= texts.len() - 3, "{name}: only {lossless_keep} strings round-trip");
    }
    // A padded batch decodes row by row; the pad token is special and skipped.
    let len = want.iter().map(|w| w.ids.len()).max().unwrap();
    let mut batch = vec![pad_id(name); want.len() * len];
    for (r, w) in want.iter().enumerate() {
        batch[r * len..][..w.ids.len()].copy_from_slice(&w.ids);
    }
    let ids = Tensor::from_vec(&[want.len(), len], batch).unwrap();
    let got = skip.run([("ids", ids)]).expect("run").output("text").unwrap().to_vec::<String>().unwrap();
    let expected: Vec<String> = want.iter().map(|w| w.decoded_skip.clone()).collect();
    assert_eq!(got, expected, "{name}: batch decode");
    println!("{name}: {} strings decoded, {lossless} round-trip exactly", texts.len());
}

#[test]
fn smollm2_encode_matches_python_tokenizers() {
    check_encode("smollm2");
}

#[test]
fn minilm_encode_matches_python_tokenizers() {
    check_encode("minilm");
}

#[test]
fn tiny_fixtures_encode_matches_python_tokenizers() {
    check_encode("tiny_gpt2");
    // tiny-llama ships the same tokenizer.json
    let a = read(&repo("conformance/fixtures/tiny/tiny-gpt2/onnx_optimum/tokenizer.json"));
    let b = read(&repo("conformance/fixtures/tiny/tiny-llama/onnx_optimum/tokenizer.json"));
    assert_eq!(a, b, "tiny-llama's tokenizer.json differs from tiny-gpt2's: give it its own references");
}

#[test]
fn smollm2_decode_matches_python_tokenizers() {
    check_decode("smollm2");
}

#[test]
fn minilm_decode_matches_python_tokenizers() {
    check_decode("minilm");
}

#[test]
fn tiny_fixtures_decode_matches_python_tokenizers() {
    check_decode("tiny_gpt2");
}

fn attr_s(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn attr_i(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// A one-node model of `op` (domain ai.onnx.contrib) from the tokenizer model's frame.
fn contrib_model(
    op: &str,
    attrs: Vec<pb::AttributeProto>,
    input: (&str, i32, usize),
    outputs: &[(&str, i32, usize)],
) -> Vec<u8> {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let vi = |name: &str, ty: i32, rank: usize| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: ty,
                shape: Some(pb::TensorShapeProto {
                    dim: (0..rank)
                        .map(|d| Dimension { value: Some(D::DimParam(format!("d{d}"))), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node = pb::NodeProto {
        name: format!("my_{op}"),
        op_type: op.into(),
        domain: CONTRIB_DOMAIN.into(),
        input: vec![input.0.into()],
        output: outputs.iter().map(|o| o.0.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    };
    let opset = |d: &str, v| pb::OperatorSetIdProto { domain: d.into(), version: v };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17), opset(CONTRIB_DOMAIN, 1)],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: vec![node],
            input: vec![vi(input.0, input.1, input.2)],
            output: outputs.iter().map(|o| vi(o.0, o.1, o.2)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

const STRING: i32 = 8;
const INT64: i32 = 7;

/// vocab.json and merges.txt of the tiny fixtures' byte-level BPE.
fn tiny_vocab_merges() -> (String, String, Value) {
    let j: Value = serde_json::from_str(&files("tiny_gpt2").0).unwrap();
    let vocab = serde_json::to_string(&j["model"]["vocab"]).unwrap();
    let merges: Vec<String> = j["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            other => panic!("merge {other}"),
        })
        .collect();
    (vocab, format!("#version: 0.2\n{}\n", merges.join("\n")), j)
}

fn gpt2_model(padding_length: i64) -> Vec<u8> {
    let (vocab, merges, _) = tiny_vocab_merges();
    contrib_model(
        "GPT2Tokenizer",
        vec![attr_s("vocab", &vocab), attr_s("merges", &merges), attr_i("padding_length", padding_length)],
        ("text", STRING, 1),
        &[("input_ids", INT64, 2), ("attention_mask", INT64, 2)],
    )
}

#[test]
fn gpt2_tokenizer_matches_python_tokenizers() {
    // vocab.json + merges.txt of the tiny fixtures' tokenizer: the same ids as its tokenizer.json, except where the
    // text types its added tokens <|im_start|>/<|im_end|> (GPT2Tokenizer knows <|endoftext|> only).
    let s = session(&gpt2_model(-1));
    let texts = corpus();
    let want = refs("tiny_gpt2");
    let mut compared = 0;
    for (text, w) in texts.iter().zip(&want) {
        if text.contains("<|im_") {
            continue;
        }
        let out = s.run([("text", strings(std::slice::from_ref(text)))]).expect("run");
        assert_eq!(out.output("input_ids").unwrap().to_vec::<i64>().unwrap(), w.ids, "GPT2Tokenizer: {text:?}");
        compared += 1;
    }
    assert!(compared >= 200, "{compared}");
    // padding_length truncates and pads (with id 0, mask 0).
    let s = session(&gpt2_model(4));
    let out = s.run([("text", strings(&["Hello, world! How are you?".into(), "a".into()]))]).expect("run");
    let ids = out.output("input_ids").unwrap();
    assert_eq!(ids.dims(), &[2, 4]);
    let full = &want[texts.iter().position(|t| t == "Hello, world!").unwrap()].ids;
    assert_eq!(&ids.to_vec::<i64>().unwrap()[..4], &full[..4]);
    assert_eq!(out.output("attention_mask").unwrap().to_vec::<i64>().unwrap(), vec![1, 1, 1, 1, 1, 0, 0, 0]);
}

/// GPT-2's byte ↔ unicode table (`bytes_to_unicode`).
fn bytes_to_unicode() -> Vec<(char, u8)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter().zip(&cs).map(|(b, c)| (char::from_u32(*c).unwrap(), *b as u8)).collect()
}

fn bpe_decoder_attrs(skip: bool) -> Vec<pb::AttributeProto> {
    let (_, _, j) = tiny_vocab_merges();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let mut by_id = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        by_id[id.as_u64().unwrap() as usize] = t.clone();
    }
    let added: Vec<(i64, String)> = j["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_i64().unwrap(), a["content"].as_str().unwrap().into()))
        .collect();
    let byte_decoder: Vec<String> = bytes_to_unicode().iter().map(|(c, b)| format!("{}\t{b}", *c as u32)).collect();
    vec![
        attr_s("id_vocab", &by_id.join("\n")),
        attr_s("byte_decoder", &byte_decoder.join("\n")),
        attr_s("added_tokens", &added.iter().map(|(i, t)| format!("{i}\t{t}")).collect::<Vec<_>>().join("\n")),
        attr_s("all_special_ids", &added.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join("\n")),
        attr_i("skip_special_tokens", skip as i64),
    ]
}

#[test]
fn bpe_decoder_matches_python_tokenizers() {
    let texts = corpus();
    let want = refs("tiny_gpt2");
    for skip in [false, true] {
        let s =
            session(&contrib_model("BpeDecoder", bpe_decoder_attrs(skip), ("ids", INT64, 2), &[("str", STRING, 1)]));
        for (text, w) in texts.iter().zip(&want) {
            let ids = Tensor::from_vec(&[1, w.ids.len()], w.ids.clone()).unwrap();
            let got = s.run([("ids", ids)]).expect("run").output("str").unwrap().to_vec::<String>().unwrap();
            let expected = if skip { &w.decoded_skip } else { &w.decoded };
            assert_eq!(&got[0], expected, "BpeDecoder (skip {skip}): {text:?}");
        }
    }
}

#[test]
fn malformed_tokenizer_json_is_a_load_error_naming_the_node() {
    let (json, config) = files("tiny_gpt2");
    let good = model_from_tokenizer_json(&json, &config).unwrap();
    for (bad, what) in [(&json[..json.len() / 2], "truncated"), ("{\"model\": 3}", "wrong shape"), ("", "empty")] {
        assert!(model_from_tokenizer_json(bad, &config).is_err(), "{what}: the helper accepts it");
        let mut m = pb::ModelProto::decode(&*good).unwrap();
        let node = &mut m.graph.as_mut().unwrap().node[0];
        node.name = "my_tokenizer".into();
        node.attribute.iter_mut().find(|a| a.name == "tokenizer_vocab").unwrap().s = bad.as_bytes().to_vec();
        let err = Session::from_bytes(&m.encode_to_vec(), &SessionOptions::default()).err().expect("load must fail");
        let msg = err.to_string();
        assert!(msg.contains("my_tokenizer") && msg.contains("tokenizer_vocab"), "{what}: {msg}");
    }
    // A malformed tokenizer_config too.
    let mut m = pb::ModelProto::decode(&*good).unwrap();
    let node = &mut m.graph.as_mut().unwrap().node[0];
    node.attribute.iter_mut().find(|a| a.name == "tokenizer_config").unwrap().s = b"{not json".to_vec();
    let msg =
        Session::from_bytes(&m.encode_to_vec(), &SessionOptions::default()).err().expect("load must fail").to_string();
    assert!(msg.contains("tokenizer") && msg.contains("tokenizer_config"), "{msg}");
    // GPT2Tokenizer with broken merges, BpeDecoder without id_vocab.
    let (vocab, _, _) = tiny_vocab_merges();
    let m = contrib_model(
        "GPT2Tokenizer",
        vec![attr_s("vocab", &vocab), attr_s("merges", "#version: 0.2\nnospace\n")],
        ("text", STRING, 1),
        &[("input_ids", INT64, 2)],
    );
    let msg = Session::from_bytes(&m, &SessionOptions::default()).err().expect("load must fail").to_string();
    assert!(msg.contains("my_GPT2Tokenizer") && msg.contains("merges"), "{msg}");
    let m =
        contrib_model("BpeDecoder", vec![attr_s("byte_decoder", "33\t33")], ("ids", INT64, 2), &[("str", STRING, 1)]);
    let msg = Session::from_bytes(&m, &SessionOptions::default()).err().expect("load must fail").to_string();
    assert!(msg.contains("my_BpeDecoder") && msg.contains("id_vocab"), "{msg}");
}

#[test]
fn non_string_input_is_a_clear_error() {
    let (json, config) = files("tiny_gpt2");
    let s = session(&model_from_tokenizer_json(&json, &config).unwrap());
    let err = s.run([("input_text", Tensor::from_vec(&[2], vec![1i64, 2]).unwrap())]).expect_err("run must fail");
    assert!(err.to_string().contains("input_text") && err.to_string().contains("string"), "{err}");
    // The session keeps working.
    let out = s.run([("input_text", strings(&["ok".into()]))]).expect("run");
    assert_eq!(out.output("input_ids").unwrap().dims()[0], 1);
    // A model that routes int64 into the tokenizer fails at load, naming the node and the type.
    let m = contrib_model(
        "HfJsonTokenizer",
        vec![attr_s("tokenizer_vocab", &json), attr_s("tokenizer_config", &config)],
        ("ids", INT64, 1),
        &[("input_ids", INT64, 2)],
    );
    let msg = Session::from_bytes(&m, &SessionOptions::default()).err().expect("load must fail").to_string();
    assert!(msg.contains("my_HfJsonTokenizer") && msg.contains("string"), "{msg}");
    // Decoders reject string ids at run time through the session's type check, and negative ids in the op.
    let d = session(&decoder_model_from_tokenizer_json(&json, &config, true).unwrap());
    let err = d.run([("ids", Tensor::from_vec(&[1, 2], vec![5i64, -1]).unwrap())]).expect_err("run must fail");
    assert!(err.to_string().contains("-1"), "{err}");
    let out = d.run([("ids", Tensor::from_vec(&[1, 0], Vec::<i64>::new()).unwrap())]).expect("run");
    assert_eq!(out.output("text").unwrap().to_vec::<String>().unwrap(), vec![String::new()]);
}

#[test]
fn other_domains_go_to_tract() {
    // An op named like a contrib op in another domain is not taken by kiln's builder.
    let m = contrib_model("BpeDecoder", bpe_decoder_attrs(false), ("ids", INT64, 2), &[("str", STRING, 1)]);
    let mut p = pb::ModelProto::decode(&*m).unwrap();
    p.graph.as_mut().unwrap().node[0].domain = "com.example".into();
    assert!(Session::from_bytes(&p.encode_to_vec(), &SessionOptions::default()).is_err());
}

fn minilm_model() -> Option<PathBuf> {
    let p = repo("../shared/models/all-minilm-l6-v2/onnx/model_quantized.onnx");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (the tokenizer → MiniLM chain test needs it)", p.display());
        None
    }
}

#[test]
fn tokenizer_minilm_mean_pooling_matches_python_and_onnxruntime() {
    let Some(path) = minilm_model() else { return };
    let reference: Value = serde_json::from_str(&read(&data("minilm_embeddings.json"))).unwrap();
    let sentences: Vec<String> =
        reference["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let (json, config) = files("minilm");
    let tok = session(&model_from_tokenizer_json(&json, &config).unwrap());
    let bert = Session::from_path(&path, &SessionOptions::default()).expect("MiniLM");
    let mut out = tok.run([("input_text", strings(&sentences))]).expect("tokenize");
    let ids = out.take("input_ids").unwrap();
    let mask = out.take("attention_mask").unwrap();
    let want_ids: Vec<i64> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    assert_eq!(ids.to_vec::<i64>().unwrap(), want_ids, "token ids");
    let dims = ids.dims().to_vec();
    let types = Tensor::from_vec(&dims, vec![0i64; dims[0] * dims[1]]).unwrap();
    let hidden = bert
        .run([("input_ids", ids), ("attention_mask", mask.clone()), ("token_type_ids", types)])
        .expect("MiniLM")
        .take("last_hidden_state")
        .unwrap();
    let (n, l, h) = (hidden.dims()[0], hidden.dims()[1], hidden.dims()[2]);
    let hidden = hidden.to_vec::<f32>().unwrap();
    let mask = mask.to_vec::<i64>().unwrap();
    let (mut worst, mut lowest) = (0f32, 1f32);
    let (mut got, mut wants) = (Vec::new(), Vec::new());
    for (s, want) in reference["embeddings"].as_array().unwrap().iter().enumerate() {
        let mut pooled = vec![0f32; h];
        let count = mask[s * l..(s + 1) * l].iter().sum::<i64>().max(1) as f32;
        for t in 0..l {
            if mask[s * l + t] != 0 {
                for (p, x) in pooled.iter_mut().zip(&hidden[(s * l + t) * h..][..h]) {
                    *p += x;
                }
            }
        }
        let norm = pooled.iter().map(|x| (x / count).powi(2)).sum::<f32>().sqrt().max(1e-12);
        let emb: Vec<f32> = pooled.iter().map(|x| x / count / norm).collect();
        let want: Vec<f32> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        wants.push(want.clone());
        got.push(emb.clone());
        let cos: f32 = emb.iter().zip(&want).map(|(a, b)| a * b).sum();
        let diff = emb.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("sentence {s}: cosine {cos:.6}, max |diff| {diff:.2e}");
        worst = worst.max(diff);
        lowest = lowest.min(cos);
    }
    assert_eq!(n, reference["embeddings"].as_array().unwrap().len());
    println!("MiniLM chain: {n} sentences, lowest cosine {lowest:.6}, max |embedding diff| vs onnxruntime {worst:.2e}");
    // The ids are identical (above) and kiln computes every node as onnxruntime's CPU kernels do (Div, Erf, Softmax,
    // LayerNormalization, and the SkipLayerNormalization and Gelu arithmetic of onnxruntime's fusions: see
    // kiln_ops::layer_norm and kiln_ops::gelu_div), so the hidden states are bit-identical and the embeddings differ
    // only by the reference's 7 decimals and the pooling's summation order. Any ulp of difference before a
    // DynamicQuantizeLinear would flip uint8 codes and compound over the six layers (cosine 0.98 before).
    assert!(lowest >= 0.99999 && worst < 1e-6, "embeddings differ from onnxruntime's");
    // Retrieval agrees: every kiln embedding is nearest to onnxruntime's embedding of the same sentence.
    for (s, e) in got.iter().enumerate() {
        let best = wants
            .iter()
            .enumerate()
            .map(|(j, w)| (j, e.iter().zip(w).map(|(a, b)| a * b).sum::<f32>()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!(best.0, s, "sentence {s} is nearest to reference {}", best.0);
    }
}

/// Writes kiln's tokenizer models and their outputs on the corpus, then `check_ortx.py` runs the same models in
/// onnxruntime with onnxruntime-extensions and compares. Skips (saying so) where the venv or the package is absent.
#[test]
fn models_load_in_onnxruntime_extensions() {
    let python = repo(".venv/bin/python");
    if !python.is_file() {
        eprintln!("SKIPPED: no Python venv at {}", python.display());
        return;
    }
    let probe = std::process::Command::new(&python).args(["-c", "import onnxruntime_extensions"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED: the PyPI package onnxruntime-extensions cannot be imported in {}", python.display());
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-ortx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let texts = corpus();
    let mut cases = Vec::new();
    for name in ["smollm2", "tiny_gpt2", "minilm"] {
        let (json, config) = files(name);
        let model = model_from_tokenizer_json(&json, &config).unwrap();
        let file = dir.join(format!("{name}_tokenizer.onnx"));
        std::fs::write(&file, &model).unwrap();
        cases.push(serde_json::json!({"name": name, "kind": "encode", "model": file, "refs": data(&format!("refs_{name}.json"))}));
    }
    let file = dir.join("gpt2_tokenizer.onnx");
    std::fs::write(&file, gpt2_model(-1)).unwrap();
    cases.push(serde_json::json!({"name": "GPT2Tokenizer", "kind": "encode", "model": file, "refs": data("refs_tiny_gpt2.json")}));
    for skip in [false, true] {
        let file = dir.join(format!("bpe_decoder_{skip}.onnx"));
        std::fs::write(
            &file,
            contrib_model("BpeDecoder", bpe_decoder_attrs(skip), ("ids", INT64, 2), &[("str", STRING, 1)]),
        )
        .unwrap();
        cases.push(serde_json::json!({"name": format!("BpeDecoder skip={skip}"), "kind": if skip { "decode_skip" } else { "decode" }, "model": file, "refs": data("refs_tiny_gpt2.json")}));
    }
    let _ = texts;
    let spec = dir.join("cases.json");
    std::fs::write(&spec, serde_json::to_string(&cases).unwrap()).unwrap();
    let out = std::process::Command::new(&python).arg(data("check_ortx.py")).arg(&spec).output().expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "check_ortx.py failed");
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).expect("report");
    // onnxruntime-extensions has HfJsonTokenizer for BPE tokenizer.json files, GPT2Tokenizer and BpeDecoder: kiln's
    // models load there; its WordPiece support through HfJsonTokenizer is absent, which the report records.
    for name in ["smollm2", "tiny_gpt2", "GPT2Tokenizer", "BpeDecoder skip=false", "BpeDecoder skip=true"] {
        assert_eq!(report[name]["loaded"], Value::Bool(true), "{name}: {}", report[name]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Encode throughput of the op in a kiln Session on the corpus (one string per run, and the corpus as one batch).
/// `cargo test --release -p kiln-ops --test tokenizer -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput() {
    let texts = corpus();
    let bytes: usize = texts.iter().map(|t| t.len()).sum();
    for name in ["smollm2", "minilm", "tiny_gpt2"] {
        let (json, config) = files(name);
        let s = session(&model_from_tokenizer_json(&json, &config).unwrap());
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            for text in &texts {
                s.run([("input_text", strings(std::slice::from_ref(text)))]).unwrap();
            }
        }
        let single = (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e6;
        let batch = strings(&texts);
        let t = Instant::now();
        for _ in 0..reps {
            s.run([("input_text", batch.clone())]).unwrap();
        }
        let batched = (bytes * reps) as f64 / t.elapsed().as_secs_f64() / 1e6;
        println!("{name}: {bytes} bytes; one string per run {single:.2} MB/s; corpus as one batch {batched:.2} MB/s");
    }
}

#[test]
fn optional_outputs_may_be_left_out() {
    // onnxruntime-extensions' layout: input_ids, (no attention_mask), offset_mapping.
    let (json, config) = files("tiny_gpt2");
    let mut m = pb::ModelProto::decode(&*model_from_tokenizer_json(&json, &config).unwrap()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node[0].output = vec!["input_ids".into(), "".into(), "offset_mapping".into()];
    g.output[1].name = "offset_mapping".into();
    let s = session(&m.encode_to_vec());
    let out = s.run([("input_text", strings(&["Hello world".into(), "a".into()]))]).expect("run");
    let l = out.output("input_ids").unwrap().dims()[1];
    let offsets = out.output("offset_mapping").unwrap();
    assert_eq!(offsets.dims(), &[2, l, 2]);
    let o = offsets.to_vec::<i64>().unwrap();
    assert_eq!((o[0], o[2 * l - 1]), (0, 11), "row 0 spans `Hello world`");
    assert_eq!(&o[2 * l..2 * l + 2], &[0, 1], "row 1 is `a`");
    assert!(o[2 * l + 2..].iter().all(|&x| x == 0), "padding has zero offsets");
}
