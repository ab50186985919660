//! Weights streamed from external data into GPU buffers (kiln_graph::stream, provider/src/gpu_stream.rs): a WebGPU
//! session leaves every external initializer of at least `min_bytes` in the data source and fills its GPU buffer a
//! bounded range at a time, never holding it whole in host memory; a weight a CPU node reads is read into memory.
//!
//! The models are the tiny fixtures (and small graphs) rewritten here with their initializers moved to an external
//! data file; the data source records every range read. Checked: outputs against onnxruntime's reference data and
//! against the CPU session, no read over the chunk size, every streamed weight read once and absent from the plan's
//! host constants, a CPU reader materialised correctly, errors that name the tensor and file, and (in a child
//! process) the peak memory of a load with and without streaming. Skips, loudly, only without a GPU adapter.
#![cfg(all(not(target_arch = "wasm32"), target_os = "linux"))]

mod common;
mod graphs;
#[path = "common/stream.rs"]
mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use graphs::*;
use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, SessionOptions, Tensor, WeightStreaming};
use prost::Message;
use stream::*;

#[test]
fn tiny_llama_fp32_streams_its_weights() {
    fixture("tiny-llama/onnx_optimum", 1e-4);
}

#[test]
fn tiny_llama_fp16_streams_its_weights() {
    fixture("tiny-llama/onnx_optimum_fp16", 2e-2);
}

#[test]
fn tiny_llama_q4_streams_its_weights() {
    fixture("tiny-llama/onnx_optimum_q4", 1e-3);
}

#[test]
fn tiny_gpt2_streams_its_weights() {
    fixture("tiny-gpt2/onnx_optimum", 1e-4);
}

/// The fixtures as they are, one file each: kiln_graph::skeleton leaves their large initializers in the model file
/// (read a window at a time, never whole) and the GPU session streams them from there.
#[test]
fn single_file_fixtures_stream_their_weights_from_the_model_file() {
    for (model, tolerance) in [
        ("tiny-llama/onnx_optimum", 1e-4),
        ("tiny-llama/onnx_optimum_fp16", 2e-2),
        ("tiny-llama/onnx_optimum_q4", 1e-3),
        ("tiny-gpt2/onnx_optimum", 1e-4),
    ] {
        fixture_as(model, tolerance, Layout::SingleFile);
    }
}

/// y = x · W · V on the GPU and d = Det(W): Det takes no streamed weight (kiln_graph's streamable_use), so W is
/// read at import; V, read by a MatMul only, is streamed. Both against the CPU session. (A streamable weight a CPU node reads
/// is read when the session is made: gpu_stream_split.rs.)
#[test]
fn a_weight_with_a_cpu_reader_is_read_into_memory() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream");
    let n = 48usize;
    let (w, v) = (rng.vec(n * n), rng.vec(n * n));
    let bytes = model(
        vec![
            node("MatMul", &["x", "w"], "y0", vec![]),
            node("MatMul", &["y0", "v"], "y", vec![]),
            node("Det", &["w"], "d", vec![]),
        ],
        vec![value_info("x", 1, Some(&[Some(2), Some(n)]))],
        vec![value_info("y", 1, None), value_info("d", 1, None)],
        vec![f32_init("w", &[n, n], &w), f32_init("v", &[n, n], &v)],
    );
    let (ext, data, moved) = externalize(&bytes, 1024);
    assert_eq!(moved.len(), 2);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, 1024)).expect("loading");
    assert_eq!(session.execution_provider(), ExecutionProvider::WebGpu);
    let report = session.gpu_placement().expect("report");
    // v streamed, w read at import (a constant: Det(w) is even folded at load)
    assert_eq!(report.weights_streamed, 1, "{report:?}");
    assert_eq!(report.weights_on_gpu, 2, "{report:?}");
    check_reads("det", &source, &moved, 1024, 1024);
    let x = Tensor::from_vec(&[2, n], rng.vec(2 * n)).unwrap();
    let got = session.run([("x", x.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("x", x)]).expect("running on the CPU");
    for name in ["y", "d"] {
        let (diff, ref_max) = max_diff(name, got.output(name).unwrap(), want.output(name).unwrap());
        assert!(diff <= 1e-4 * ref_max.max(1.0), "{name}: max|diff| {diff:.3e} (max|ref| {ref_max})");
    }
}

/// A missing data file and a truncated one: errors naming the tensor and the file, no panic.
#[test]
fn a_missing_or_short_source_names_the_tensor() {
    let n = 64usize;
    let bytes = model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![value_info("x", 1, Some(&[Some(1), Some(n)]))],
        vec![value_info("y", 1, None)],
        vec![f32_init("w", &[n, n], &vec![0.5; n * n])],
    );
    let (ext, mut data, _) = externalize(&bytes, 1024);
    let empty = Arc::new(Recording::default());
    let err = Session::from_bytes(&ext, &gpu_options(empty, 1024, 1024)).err().expect("an error without the file");
    let msg = err.to_string();
    assert!(msg.contains("`w`") && msg.contains("weights.bin"), "{msg}");
    data.truncate(data.len() - 10);
    let err = Session::from_bytes(&ext, &gpu_options(recording(data), 1024, 1024)).err().expect("a short file");
    let msg = err.to_string();
    assert!(msg.contains("`w`") && msg.contains("weights.bin"), "{msg}");
}

/// A data source with no synchronous read, as a browser's Blob is: everything goes through `read_range`.
struct AsyncOnly(kiln_provider::InMemoryResolver);

impl kiln_provider::ExternalDataResolver for AsyncOnly {
    fn read(&self, location: &str, _offset: u64, _length: Option<u64>) -> kiln_provider::Result<Vec<u8>> {
        Err(kiln_provider::Error::io(format!("no synchronous read of `{location}` here")))
    }
    fn read_range<'a>(&'a self, location: &'a str, offset: u64, length: u64) -> kiln_provider::ReadFuture<'a> {
        Box::pin(std::future::ready(self.0.read(location, offset, Some(length))))
    }
}

/// External tensors outside the main graph's initializers — a Constant's `value` attribute, and the initializers of
/// an If's branches — load on the GPU through a data source with asynchronous reads only (as in a browser, where
/// the import's synchronous read has nothing to call): the streaming import reads them range by range too. Both
/// branches against the CPU session (which reads the same file synchronously).
#[test]
fn external_tensors_in_attributes_and_subgraphs_load_without_synchronous_reads() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream nested");
    let n = 32usize;
    let (c, t1, e1) = (rng.vec(n * n), rng.vec(n), rng.vec(n));
    let mut data = vec![];
    let mut external = |name: &str, dims: &[usize], v: &[f32]| {
        data.push(7u8);
        let offset = data.len();
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        pb::TensorProto {
            name: name.into(),
            dims: dims.iter().map(|d| *d as i64).collect(),
            data_type: 1,
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                kv("location", "weights.bin".into()),
                kv("offset", offset.to_string()),
                kv("length", (v.len() * 4).to_string()),
            ],
            ..Default::default()
        }
    };
    let constant = pb::NodeProto {
        op_type: "Constant".into(),
        output: vec!["c".into()],
        attribute: vec![pb::AttributeProto {
            name: "value".into(),
            r#type: pb::attribute_proto::AttributeType::Tensor as i32,
            t: Some(external("c_value", &[n, n], &c)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let branch = |name: &str, op: &str, init: pb::TensorProto| pb::GraphProto {
        name: name.into(),
        node: vec![node(op, &["y0", &init.name.clone()], &format!("{name}_out"), vec![])],
        output: vec![value_info(&format!("{name}_out"), 1, None)],
        initializer: vec![init],
        ..Default::default()
    };
    let graph_attr = |name: &str, g: pb::GraphProto| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    };
    let if_node = pb::NodeProto {
        op_type: "If".into(),
        input: vec!["cond".into()],
        output: vec!["y".into()],
        attribute: vec![
            graph_attr("then_branch", branch("then", "Add", external("t1", &[n], &t1))),
            graph_attr("else_branch", branch("else", "Sub", external("e1", &[n], &e1))),
        ],
        ..Default::default()
    };
    let bytes = model(
        vec![constant, node("MatMul", &["x", "c"], "y0", vec![]), if_node],
        vec![value_info("x", 1, Some(&[Some(2), Some(n)])), value_info("cond", 9, Some(&[]))],
        vec![value_info("y", 1, None)],
        vec![],
    );
    let source = Arc::new(AsyncOnly(kiln_provider::InMemoryResolver::new().with_file("weights.bin", data.clone())));
    let opts = SessionOptions {
        execution_providers: vec![ExecutionProvider::WebGpu],
        external_data: Some(source),
        weight_streaming: WeightStreaming { enabled: true, min_bytes: 1024, chunk_bytes: 1024 },
        ..Default::default()
    };
    let gpu = Session::from_bytes(&bytes, &opts).expect("loading with asynchronous reads only");
    assert_eq!(gpu.execution_provider(), ExecutionProvider::WebGpu, "{:?}", gpu.provider_note());
    let cpu = Session::from_bytes(&bytes, &cpu_options(recording(data))).expect("loading on the CPU");
    for cond in [true, false] {
        let feeds = vec![
            ("x".to_string(), Tensor::from_vec(&[2, n], rng.vec(2 * n)).unwrap()),
            ("cond".to_string(), Tensor::from_vec(&[], vec![cond]).unwrap()),
        ];
        let got = gpu.run(feeds.clone()).expect("running on the GPU session");
        let want = cpu.run(feeds).expect("running on the CPU");
        let (diff, ref_max) = max_diff("y", got.output("y").unwrap(), want.output("y").unwrap());
        assert!(diff <= 1e-4 * ref_max.max(1.0), "cond {cond}: max|diff| {diff:.3e} (max|ref| {ref_max})");
    }
}

#[test]
fn tiny_llama_int8_streams_its_weights() {
    fixture("tiny-llama/onnx_optimum_int8", 1e-3);
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

const CHAIN: usize = 4;
const SIDE: usize = 2048;
const CHILD_CHUNK: u64 = 4 << 20;

/// The child of [`streaming_bounds_the_peak_memory_of_a_load`]: loads the model of `KILN_STREAM_CHILD_DIR` from
/// its folder (streaming as `KILN_STREAM_CHILD` says), runs it once and prints the growth of its peak memory.
#[test]
#[ignore = "run by streaming_bounds_the_peak_memory_of_a_load in a process of its own"]
fn peak_memory_child() {
    let (Ok(dir), Ok(mode)) = (std::env::var("KILN_STREAM_CHILD_DIR"), std::env::var("KILN_STREAM_CHILD")) else {
        return;
    };
    let streaming = if mode == "on" {
        WeightStreaming { chunk_bytes: CHILD_CHUNK, ..Default::default() }
    } else {
        WeightStreaming::off()
    };
    let opts = SessionOptions { weight_streaming: streaming, ..options(ExecutionProvider::WebGpu) };
    // the driver and the device first, on a small model: the measure is the load of the big one
    let warm = model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![value_info("x", 1, Some(&[Some(1), Some(8)]))],
        vec![value_info("y", 1, None)],
        vec![f32_init("w", &[8, 8], &[0.5; 64])],
    );
    let s = Session::from_bytes(&warm, &opts).expect("the small model");
    s.run([("x", Tensor::from_vec(&[1, 8], vec![1f32; 8]).unwrap())]).expect("running the small model");
    drop(s);
    let before = peak_rss();
    let session = Session::from_path(std::path::Path::new(&dir).join("model.onnx"), &opts).expect("loading");
    assert_eq!(session.execution_provider(), ExecutionProvider::WebGpu);
    let x: Vec<f32> = (0..SIDE).map(|i| ((i % 7) as f32 - 3.0) / 8.0).collect();
    let out = session.run([("x", Tensor::from_vec(&[1, SIDE], x).unwrap())]).expect("running");
    let y = out.output("y").unwrap().to_f64_vec().unwrap();
    let report = session.gpu_placement().expect("report");
    println!(
        "KILN_STREAM_RESULT growth={} streamed={} sum={:.6e} first={:.6e}",
        peak_rss() - before,
        report.weights_streamed,
        y.iter().sum::<f64>(),
        y[0]
    );
}

/// A model with 4 × 16 MiB of weights, external and in one file, loaded from files on the GPU in a fresh process
/// each way: with streaming (4 MiB reads) the peak memory grows by the weights once (lavapipe's GPU buffers are host memory) plus
/// a few chunks; without it, by more than half the weights again. Both runs give the same outputs (to rounding).
#[test]
fn streaming_bounds_the_peak_memory_of_a_load() {
    let _ = peak_rss();
    if !gpu_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let mut data: Vec<u8> = Vec::with_capacity(CHAIN * SIDE * SIDE * 4);
    let mut inits = vec![];
    let mut nodes = vec![];
    let mut rng = Rng::seeded("gpu_stream peak");
    for i in 0..CHAIN {
        let offset = data.len();
        for _ in 0..SIDE * SIDE {
            data.extend((rng.range(-1.0, 1.0) * 2.0 / (SIDE as f32).sqrt()).to_le_bytes());
        }
        let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        inits.push(pb::TensorProto {
            name: format!("w{i}"),
            dims: vec![SIDE as i64, SIDE as i64],
            data_type: 1,
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                kv("location", "model.onnx.data".into()),
                kv("offset", offset.to_string()),
                kv("length", (SIDE * SIDE * 4).to_string()),
            ],
            ..Default::default()
        });
        let (a, y) = (if i == 0 { "x".to_string() } else { format!("h{i}") }, format!("h{}", i + 1));
        nodes.push(node("MatMul", &[&a, &format!("w{i}")], if i + 1 == CHAIN { "y" } else { &y }, vec![]));
    }
    // the same model as one file, its weights inline (kiln_graph::skeleton leaves them in the file)
    let inline: Vec<pb::TensorProto> = inits
        .iter()
        .map(|t| {
            let offset: usize = t.external_data[1].value.parse().unwrap();
            pb::TensorProto {
                raw_data: data[offset..offset + SIDE * SIDE * 4].to_vec(),
                external_data: vec![],
                data_location: None,
                ..t.clone()
            }
        })
        .collect();
    let io = || (vec![value_info("x", 1, Some(&[Some(1), Some(SIDE)]))], vec![value_info("y", 1, None)]);
    let (inputs, outputs) = io();
    // (in one file, each weight read as Gemm's transposed B: the stored [N, K] is the one-row kernel's layout as it
    // is; the external model's MatMul weights are transposed as they upload)
    let gemms: Vec<pb::NodeProto> = nodes
        .iter()
        .map(|n| pb::NodeProto { op_type: "Gemm".into(), attribute: vec![attr_int("transB", 1)], ..n.clone() })
        .collect();
    let bytes = model(nodes, inputs, outputs, inits);
    std::fs::write(dir.join("model.onnx"), bytes).expect("writing the model");
    std::fs::write(dir.join("model.onnx.data"), &data).expect("writing the data");
    let single = dir.join("single");
    std::fs::create_dir_all(&single).expect("a temp dir");
    let (inputs, outputs) = io();
    std::fs::write(single.join("model.onnx"), model(gemms, inputs, outputs, inline)).expect("writing the model");
    let weights = data.len() as u64;
    drop(data);
    let exe = std::env::current_exe().expect("the test binary");
    let run_in = |mode: &str, dir: &std::path::Path| -> (u64, usize, String) {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "peak_memory_child", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("KILN_STREAM_CHILD", mode)
            .env("KILN_STREAM_CHILD_DIR", dir)
            .output()
            .expect("running the child");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find_map(|l| l.find("KILN_STREAM_RESULT").map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("{text}"));
        let field = |k: &str| line.split_whitespace().find_map(|f| f.strip_prefix(k)).unwrap_or("").to_string();
        let growth: u64 = field("growth=").parse().expect("growth");
        let streamed: usize = field("streamed=").parse().expect("streamed");
        (growth, streamed, format!("{} {}", field("sum="), field("first=")))
    };
    for (what, dir) in [("external data", dir.as_path()), ("one file", single.as_path())] {
        let (on, on_streamed, on_y) = run_in("on", dir);
        let (off, off_streamed, off_y) = run_in("off", dir);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "{what}: weights {:.0} MiB: peak memory growth of the load + one run: streaming {:.0} MiB ({on_streamed} \
             streamed), without {:.0} MiB",
            mib(weights),
            mib(on),
            mib(off)
        );
        assert_eq!(on_streamed, CHAIN, "{what}");
        assert_eq!(off_streamed, 0, "{what}");
        // the same outputs up to the last bits (the one-row float-weight kernel either way: its transposed copy made
        // at load in memory, transposed as it uploads when streamed)
        let values = |s: &str| -> Vec<f64> { s.split_whitespace().map(|v| v.parse().expect("a number")).collect() };
        for (a, b) in values(&on_y).iter().zip(values(&off_y)) {
            let close = (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0);
            assert!(close, "{what}: with streaming {on_y}, without {off_y}");
        }
        // the GPU buffers (host memory on lavapipe), a read and its staging copy, the queue's 16 MiB upload window,
        // and 16 MiB for the run and the allocator
        let bound = weights + 2 * CHILD_CHUNK + (32 << 20);
        assert!(on < bound, "{what}: streaming: peak grew by {:.0} MiB (bound {:.0} MiB)", mib(on), mib(bound));
        assert!(off > on + weights / 2, "{what}: without streaming the peak grew by {:.0} MiB only", mib(off));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a CPU fallback of a streaming load does (no adapter, or the lowering failed): every ExternalWeight read into
/// memory (kiln_graph::stream::materialize_all), float16-as-float32 and packed-word views included; the model then
/// matches onnxruntime's reference like the plain import. No GPU needed.
#[test]
fn streamed_weights_materialised_for_the_cpu_match_the_reference() {
    use kiln_graph::tract_onnx::prelude::{IntoTValue, TValue, TVec};
    use kiln_graph::tract_onnx::tract_core::plan::SimplePlan;
    for (fixture, tolerance) in [("tiny-llama/onnx_optimum_fp16", 2e-2), ("tiny-llama/onnx_optimum_q4", 1e-3)] {
        let dir = tiny_fixtures().join(fixture);
        let (ext, data, _) = externalize(&std::fs::read(dir.join("model.onnx")).expect("the fixture"), 1024);
        let source: Arc<dyn kiln_provider::ExternalDataResolver> = recording(data);
        let streaming = WeightStreaming { enabled: true, min_bytes: 1024, chunk_bytes: 4096 };
        let mut proto = kiln_graph::decode(&ext).expect("decoding");
        let n = pollster::block_on(kiln_graph::stream_external_initializers(&mut proto, &*source, &streaming))
            .expect("the streaming import");
        assert!(n > 0, "{fixture}: nothing streamed");
        let load = kiln_graph::LoadOptions {
            optimization: kiln_provider::OptimizationLevel::Basic,
            external_data: Some(source),
            ..Default::default()
        };
        let mut model = kiln_graph::load_proto(proto, &load).expect("loading");
        assert!(!kiln_graph::stream::external_weights(&model.typed).is_empty(), "{fixture}: no ExternalWeight");
        let source = model.weight_source.clone();
        pollster::block_on(kiln_graph::stream::materialize_all(&mut model.typed, source.as_ref(), 4096))
            .expect("reading the weights");
        assert!(kiln_graph::stream::external_weights(&model.typed).is_empty());
        let plan = SimplePlan::new(model.typed.clone()).expect("planning");
        let set = dir.join("test_data_set_0");
        let inputs: TVec<TValue> = (0..model.inputs.len())
            .map(|j| read_tensor(&set.join(format!("input_{j}.pb"))).into_tract().into_tvalue())
            .collect();
        let outputs = plan.run(inputs).expect("running");
        for (j, got) in outputs.iter().enumerate() {
            let got = Tensor::from_tract((**got).clone()).expect("an output");
            let want = read_tensor(&set.join(format!("output_{j}.pb")));
            let (diff, ref_max) = max_diff(&format!("{fixture} output {j}"), &got, &want);
            assert!(diff <= tolerance, "{fixture} output {j}: max|diff| {diff:.3e} (max|ref| {ref_max})");
        }
    }
}

/// com.microsoft GatherBlockQuantized (4 bits, float16 scales, zero points) with its data, scales and zero points
/// streamed: packed words and float32 scales read from the source; against the CPU session.
#[test]
fn gather_block_quantized_streams_its_operands() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream gbq");
    let (rows, cols, block, bits) = (300usize, 256usize, 32usize, 4usize);
    let (packed, blocks) = (cols * bits / 8, cols / block);
    let u8s = |rng: &mut Rng, n: usize| (0..n).map(|_| (rng.next() * 255.0) as u8).collect::<Vec<u8>>();
    let scales: Vec<u8> =
        (0..rows * blocks).flat_map(|_| half::f16::from_f32(rng.range(0.01, 0.2)).to_le_bytes()).collect();
    let init = |name: &str, dt: i32, dims: &[usize], raw: Vec<u8>| pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: dt,
        raw_data: raw,
        ..Default::default()
    };
    let mut gbq = node(
        "GatherBlockQuantized",
        &["data", "ids", "scales", "zp"],
        "y",
        vec![attr_int("bits", bits as i64), attr_int("block_size", block as i64)],
    );
    gbq.domain = "com.microsoft".into();
    let bytes = model(
        vec![gbq],
        vec![value_info("ids", 7, Some(&[Some(2), Some(3)]))],
        vec![value_info("y", 10, None)],
        vec![
            init("data", 2, &[rows, packed], u8s(&mut rng, rows * packed)),
            init("scales", 10, &[rows, blocks], scales),
            init("zp", 2, &[rows, blocks * bits / 8], u8s(&mut rng, rows * blocks * bits / 8)),
        ],
    );
    let mut proto = pb::ModelProto::decode(bytes.as_slice()).expect("decoding");
    proto.opset_import.push(pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 });
    let (ext, data, moved) = externalize(&proto.encode_to_vec(), 1024);
    assert_eq!(moved.len(), 3);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, 4096)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    assert!(report.nodes.iter().all(|p| p.device == kiln_provider::Device::Gpu), "{report:?}");
    assert_eq!(report.weights_streamed, 3, "{report:?}");
    check_reads("gbq", &source, &moved, 1024, 4096);
    let ids = Tensor::from_vec(&[2, 3], vec![0i64, 299, 17, 150, 1, 298]).unwrap();
    let got = session.run([("ids", ids.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("ids", ids)]).expect("running on the CPU");
    let (diff, ref_max) = max_diff("y", got.output("y").unwrap(), want.output("y").unwrap());
    assert!(diff <= 1e-3 * ref_max.max(1.0), "y: max|diff| {diff:.3e} (max|ref| {ref_max})");
}

/// A tied float16 LM head (SmolLM2's layout): the embedding E [V, H] float16 is read by the embedding Gather and, through
/// a Transpose, by the final MatMul. Streamed, the gather and the MatMul read the stored float16 table: the
/// transposition is folded into the matmul, which is the row kernel that reads its weight as stored ([N, K]) and
/// converts float16 values as it reads them, so a run has no Transpose / AxisOp node (no per-step copy of the table)
/// and reads no float32 copy of it (twice the bytes). Against the CPU session.
#[test]
fn a_tied_float16_lm_head_streams_without_a_transpose_per_run() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream tied");
    let (v, h) = (512usize, 64usize);
    let table: Vec<u8> = (0..v * h).flat_map(|_| half::f16::from_f32(rng.range(-1.0, 1.0)).to_le_bytes()).collect();
    let e = pb::TensorProto {
        name: "embed".into(),
        dims: vec![v as i64, h as i64],
        data_type: 10,
        raw_data: table,
        ..Default::default()
    };
    let bytes = model(
        vec![
            node("Gather", &["embed", "ids"], "hidden", vec![]),
            node("Transpose", &["embed"], "embed_t", vec![]),
            node("MatMul", &["hidden", "embed_t"], "logits", vec![]),
        ],
        vec![value_info("ids", 7, Some(&[Some(1), Some(3)]))],
        vec![value_info("logits", 10, None)],
        vec![e],
    );
    let (ext, data, moved) = externalize(&bytes, 1024);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, 4096)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    assert!(report.nodes.iter().all(|p| p.device == kiln_provider::Device::Gpu), "{report:?}");
    assert!(
        !report.nodes.iter().any(|p| p.op.contains("Transpose") || p.op.contains("AxisOp") || p.op.contains("Move")),
        "a transposition runs each step: {:?}",
        report.nodes
    );
    // the float16 table for the gather and for the matmul
    assert_eq!(report.weights_streamed, 2, "{report:?}");
    assert_eq!(report.weight_bytes_streamed, 2 * (v * h * 2) as u64, "a float32 copy of the table: {report:?}");
    assert!(report.host_constants.is_empty(), "{:?}", report.host_constants);
    check_reads("tied", &source, &moved, 1024, 4096);
    let ids = Tensor::from_vec(&[1, 3], vec![0i64, 511, 42]).unwrap();
    let got = session.run([("ids", ids.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("ids", ids)]).expect("running on the CPU");
    let (diff, ref_max) = max_diff("logits", got.output("logits").unwrap(), want.output("logits").unwrap());
    assert!(diff <= 2e-2 * ref_max.max(1.0), "logits: max|diff| {diff:.3e} (max|ref| {ref_max})");
}

/// `y = x · w`: x of `x_dims` (its last dim K), w [K, n] of random values in ±1/32 as raw data, both of ONNX
/// element type `elem` (1: float32, 10: float16).
fn matmul_model(rng: &mut Rng, x_dims: &[usize], n: usize, elem: i32) -> Vec<u8> {
    let k = *x_dims.last().expect("x has a K");
    let values: Vec<f32> = (0..k * n).map(|_| rng.range(-1.0, 1.0) / 32.0).collect();
    let raw: Vec<u8> = if elem == 1 {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    } else {
        values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
    };
    let w = pb::TensorProto {
        name: "w".into(),
        dims: vec![k as i64, n as i64],
        data_type: elem,
        raw_data: raw,
        ..Default::default()
    };
    let x_dims: Vec<Option<usize>> = x_dims.iter().map(|d| Some(*d)).collect();
    model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![value_info("x", elem, Some(&x_dims))],
        vec![value_info("y", elem, None)],
        vec![w],
    )
}

/// A float MatMul's streamed weight W [K, N] runs as the one-row kernel, as one in memory does: the GPU backend
/// transposes it as it uploads (ExternalWeight's Layout::Transposed), a block of whole rows at a time (several
/// blocks, copied into place on the GPU, with a 4 KiB read size; one with 4 MiB). The output is bit for bit the
/// in-memory session's (the general matmul kernel, which a streamed weight took before, sums in another order) and
/// within rounding of the CPU session's;
/// float32 and float16 weights.
#[test]
fn streamed_float_matmul_weights_run_as_the_one_row_kernel() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream transposed");
    let (k, n) = (1024usize, 96usize);
    for (elem, size) in [(1, 4usize), (10, 2)] {
        let bytes = matmul_model(&mut rng, &[1, 1, k], n, elem);
        let xs: Vec<f32> = (0..k).map(|_| rng.range(-1.0, 1.0)).collect();
        let x = if elem == 1 {
            Tensor::from_vec(&[1, 1, k], xs.clone()).unwrap()
        } else {
            Tensor::from_vec(&[1, 1, k], xs.iter().map(|v| half::f16::from_f32(*v)).collect::<Vec<_>>()).unwrap()
        };
        let in_memory = Session::from_bytes(
            &bytes,
            &SessionOptions { weight_streaming: WeightStreaming::off(), ..options(ExecutionProvider::WebGpu) },
        )
        .expect("loading in memory");
        let want = in_memory.run([("x", x.clone())]).expect("running in memory");
        let want = want.output("y").unwrap().to_f64_vec().unwrap();
        let (ext, data, _) = externalize(&bytes, 1024);
        let cpu = Session::from_bytes(&ext, &cpu_options(recording(data.clone()))).expect("loading on the CPU");
        let on_cpu = cpu.run([("x", x.clone())]).expect("running on the CPU");
        for chunk in [4096u64, 4 << 20] {
            let what = format!("{}-byte weights, {chunk}-byte reads", size);
            let source = recording(data.clone());
            let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, chunk)).expect("loading");
            let report = session.gpu_placement().expect("on the GPU");
            assert_eq!(report.weights_streamed, 1, "{what}: {report:?}");
            assert_eq!(report.weight_bytes_streamed, (k * n * size) as u64, "{what}: {report:?}");
            check_reads(
                &what,
                &source,
                &HashMap::from([("w".to_string(), (1u64, (k * n * size) as u64))]),
                1024,
                chunk,
            );
            let got = session.run([("x", x.clone())]).expect("running streamed");
            let got_v = got.output("y").unwrap().to_f64_vec().unwrap();
            assert_eq!(got_v, want, "{what}: the streamed weight's output differs from the in-memory one's");
            let (diff, ref_max) = max_diff("y", got.output("y").unwrap(), on_cpu.output("y").unwrap());
            let tolerance = if elem == 1 { 1e-5 } else { 2e-3 };
            assert!(
                diff <= tolerance * ref_max.max(1.0),
                "{what}: max|diff| {diff:.3e} vs the CPU (max|ref| {ref_max})"
            );
        }
    }
}

/// A streamed float16 weight the one-row kernel cannot take (an odd K: its transposed rows would not be whole
/// words) stays float16 on the GPU for the general matmul kernel (kiln_graph's matmul_weights_in_f16), not the
/// float32 copy the float16 pass's cast would make: half the bytes. Against the CPU session.
#[test]
fn a_streamed_float16_weight_the_row_kernel_cannot_take_stays_float16() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream odd k");
    let (k, n) = (1025usize, 512usize);
    let bytes = matmul_model(&mut rng, &[1, k], n, 10);
    let (ext, data, _) = externalize(&bytes, 1024);
    let session = Session::from_bytes(&ext, &gpu_options(recording(data.clone()), 1024, 1 << 20)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    assert_eq!(report.weights_streamed, 1, "{report:?}");
    assert_eq!(report.weight_bytes_streamed, (k * n * 2) as u64, "a float32 copy of the weight: {report:?}");
    let x: Vec<half::f16> = (0..k).map(|_| half::f16::from_f32(rng.range(-1.0, 1.0))).collect();
    let x = Tensor::from_vec(&[1, k], x).unwrap();
    let got = session.run([("x", x.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("x", x)]).expect("running on the CPU");
    let (diff, ref_max) = max_diff("y", got.output("y").unwrap(), want.output("y").unwrap());
    assert!(diff <= 2e-3 * ref_max.max(1.0), "max|diff| {diff:.3e} (max|ref| {ref_max})");
}

/// A gathered float32 table whose rows have equal halves (a rotary cos / sin cache, which kiln's RoPE fusion reads at
/// load) stays out of the streaming and is read at import; an embedding table beside it is streamed.
#[test]
fn rotary_tables_are_read_at_import() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream rope");
    let (n, d) = (300usize, 64usize);
    let rope: Vec<f32> =
        (0..n).flat_map(|p| (0..d).map(move |i| (p as f32 * 0.01 * (i % (d / 2)) as f32).cos())).collect();
    let bytes = model(
        vec![node("Gather", &["emb", "ids"], "e", vec![]), node("Gather", &["rope", "ids"], "r", vec![])],
        vec![value_info("ids", 7, Some(&[Some(1), Some(4)]))],
        vec![value_info("e", 1, None), value_info("r", 1, None)],
        vec![f32_init("emb", &[n, d], &rng.vec(n * d)), f32_init("rope", &[n, d], &rope)],
    );
    let (ext, data, moved) = externalize(&bytes, 1024);
    assert_eq!(moved.len(), 2);
    let session = Session::from_bytes(&ext, &gpu_options(recording(data.clone()), 1024, 4096)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    assert_eq!(report.weights_streamed, 1, "{report:?}");
    let ids = Tensor::from_vec(&[1, 4], vec![0i64, 299, 150, 7]).unwrap();
    let got = session.run([("ids", ids.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("ids", ids)]).expect("running on the CPU");
    for name in ["e", "r"] {
        let (diff, _) = max_diff(name, got.output(name).unwrap(), want.output(name).unwrap());
        assert!(diff == 0.0, "{name}: max|diff| {diff:.3e}");
    }
}
