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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::*;
use graphs::*;
use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{
    ExecutionProvider, ExternalDataResolver, InMemoryResolver, SessionOptions, Tensor, WeightStreaming,
};
use prost::Message;

/// Each tensor moved to external data: (offset, length) by name.
type Moved = HashMap<String, (u64, u64)>;

/// An in-memory data source that records each range read: (location, offset, length).
#[derive(Default)]
struct Recording {
    inner: InMemoryResolver,
    reads: Mutex<Vec<(String, u64, u64)>>,
}

impl ExternalDataResolver for Recording {
    fn read(&self, location: &str, offset: u64, length: Option<u64>) -> kiln_provider::Result<Vec<u8>> {
        let bytes = self.inner.read(location, offset, length)?;
        self.reads.lock().unwrap().push((location.to_string(), offset, bytes.len() as u64));
        Ok(bytes)
    }
}

/// The model with every initializer holding at least `min` bytes of raw data moved to `weights.bin`; returns the
/// model bytes, the data file and each moved tensor's (offset, length) by name.
fn externalize(model: &[u8], min: usize) -> (Vec<u8>, Vec<u8>, Moved) {
    let mut proto = pb::ModelProto::decode(model).expect("decoding the fixture");
    let mut data = vec![];
    let mut moved = HashMap::new();
    for t in &mut proto.graph.as_mut().expect("a graph").initializer {
        if t.raw_data.len() < min {
            continue;
        }
        // odd offsets too: a source need not be aligned
        data.push(0u8);
        let (offset, length) = (data.len() as u64, t.raw_data.len() as u64);
        data.append(&mut t.raw_data);
        let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        t.external_data = vec![
            kv("location", "weights.bin".into()),
            kv("offset", offset.to_string()),
            kv("length", length.to_string()),
        ];
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        moved.insert(t.name.clone(), (offset, length));
    }
    (proto.encode_to_vec(), data, moved)
}

fn gpu_options(source: Arc<Recording>, min_bytes: u64, chunk_bytes: u64) -> SessionOptions {
    SessionOptions {
        execution_providers: vec![ExecutionProvider::WebGpu],
        external_data: Some(source),
        weight_streaming: WeightStreaming { enabled: true, min_bytes, chunk_bytes },
        ..Default::default()
    }
}

fn cpu_options(source: Arc<Recording>) -> SessionOptions {
    SessionOptions { external_data: Some(source), ..options(ExecutionProvider::Cpu) }
}

fn recording(data: Vec<u8>) -> Arc<Recording> {
    Arc::new(Recording { inner: InMemoryResolver::new().with_file("weights.bin", data), ..Default::default() })
}

/// Checks the reads of a streaming load: none over `chunk`, and each moved tensor of at least `min` bytes read
/// exactly once, range by range (`streamed` of them were streamed to the GPU).
fn check_reads(what: &str, source: &Recording, moved: &Moved, min: u64, chunk: u64) {
    let reads = source.reads.lock().unwrap().clone();
    assert!(!reads.is_empty(), "{what}: nothing was read");
    for (loc, off, len) in &reads {
        assert!(*len <= chunk, "{what}: a read of {len} bytes at {off} of {loc} exceeds the {chunk}-byte chunk");
    }
    for (name, (offset, length)) in moved {
        if *length < min {
            continue;
        }
        let mut covered: Vec<(u64, u64)> =
            reads.iter().filter(|r| r.1 >= *offset && r.1 < offset + length).map(|r| (r.1, r.2)).collect();
        covered.sort();
        let total: u64 = covered.iter().map(|c| c.1).sum();
        // the GPU copy and, for a float16 weight a gather reads as is, its float32 view: each a full read
        assert!(
            total > 0 && total.is_multiple_of(*length) && total / length <= 2,
            "{what}: `{name}` ({length} bytes) read {total} bytes in {} ranges",
            covered.len()
        );
    }
}

/// A fixture through the streaming import on the GPU, against onnxruntime's outputs and the CPU session.
fn fixture(model: &str, tolerance: f64) {
    if !gpu_available() {
        return;
    }
    let dir = tiny_fixtures().join(model);
    let bytes = std::fs::read(dir.join("model.onnx")).expect("reading the fixture");
    let (min, chunk) = (4096u64, 4096u64);
    let (ext, data, moved) = externalize(&bytes, 1024);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), min, chunk))
        .unwrap_or_else(|e| panic!("{model}: loading with streaming: {e}"));
    assert_eq!(session.execution_provider(), ExecutionProvider::WebGpu, "{model}: {:?}", session.provider_note());
    let report = session.gpu_placement().expect("a GPU session's report");
    let big: Vec<(&String, u64)> = moved.iter().filter(|m| m.1 .1 >= min).map(|m| (m.0, m.1 .1)).collect();
    eprintln!(
        "{model}: {} external tensors ({} of >= {min} bytes), {} streamed to the GPU ({} bytes there), {} host \
         constant bytes, {} reads",
        moved.len(),
        big.len(),
        report.weights_streamed,
        report.weight_bytes_streamed,
        report.host_constant_bytes,
        source.reads.lock().unwrap().len()
    );
    assert!(report.weights_streamed >= big.len(), "{model}: {} streamed of {}", report.weights_streamed, big.len());
    check_reads(model, &source, &moved, min, chunk);
    // the plan holds no host constant of a streamed weight's size
    for (node, bytes) in &report.host_constants {
        assert!(
            !big.iter().any(|b| b.1 == *bytes || b.1 * 2 == *bytes),
            "{model}: the plan holds a {bytes}-byte host constant `{node}`, the size of a streamed weight"
        );
    }
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    for set in ["test_data_set_0", "test_data_set_1"] {
        let set_dir = dir.join(set);
        let feeds = read_inputs(&session, &set_dir);
        let expected = read_outputs(&session, &set_dir);
        let got = session.run(feeds.clone()).unwrap_or_else(|e| panic!("{model}/{set}: running on the GPU: {e}"));
        let on_cpu = cpu.run(feeds).unwrap_or_else(|e| panic!("{model}/{set}: running on the CPU: {e}"));
        for (name, want) in &expected {
            let g = got.get(name).unwrap_or_else(|| panic!("{model}/{set}: no output `{name}`"));
            let (diff, ref_max) = max_diff(&format!("{model}/{set}/{name}"), g, want);
            assert!(
                diff <= tolerance,
                "{model}/{set}/{name}: max|diff| {diff:.3e} vs onnxruntime (max|ref| {ref_max})"
            );
            let (diff, _) = max_diff(name, g, on_cpu.get(name).expect("the CPU output"));
            assert!(diff <= tolerance, "{model}/{set}/{name}: max|diff| {diff:.3e} vs the CPU session");
        }
    }
}

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

/// y = x · W on the GPU and d = Det(W) (no GPU kernel) on the CPU: W has a CPU reader, so it is read into memory;
/// V, read by a GPU node only, is streamed. Both against the CPU session.
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
    let det = report.nodes.iter().find(|p| p.op.contains("Det")).expect("the Det node");
    assert_eq!(det.device, kiln_provider::Device::Cpu, "{det:?}");
    // v streamed, w read into memory (its matmul's copy goes up from it)
    assert_eq!(report.weights_streamed, 1, "{report:?}");
    assert!(report.host_constants.iter().any(|c| c.1 == (n * n * 4) as u64), "w is a host constant: {report:?}");
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

/// A model with 4 × 16 MiB of external weights loaded from files on the GPU in a fresh process each way: with
/// streaming (4 MiB reads) the peak memory grows by the weights once (lavapipe's GPU buffers are host memory) plus
/// a few chunks; without it, by more than half the weights again. Both runs give the same outputs.
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
    let bytes =
        model(nodes, vec![value_info("x", 1, Some(&[Some(1), Some(SIDE)]))], vec![value_info("y", 1, None)], inits);
    std::fs::write(dir.join("model.onnx"), bytes).expect("writing the model");
    std::fs::write(dir.join("model.onnx.data"), &data).expect("writing the data");
    let weights = data.len() as u64;
    drop(data);
    let exe = std::env::current_exe().expect("the test binary");
    let run = |mode: &str| -> (u64, usize, String) {
        let out = std::process::Command::new(&exe)
            .args(["--exact", "peak_memory_child", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("KILN_STREAM_CHILD", mode)
            .env("KILN_STREAM_CHILD_DIR", &dir)
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
    let (on, on_streamed, on_y) = run("on");
    let (off, off_streamed, off_y) = run("off");
    let _ = std::fs::remove_dir_all(&dir);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "weights {:.0} MiB: peak memory growth of the load + one run: streaming {:.0} MiB ({on_streamed} streamed), \
         without {:.0} MiB",
        mib(weights),
        mib(on),
        mib(off)
    );
    assert_eq!(on_streamed, CHAIN);
    assert_eq!(off_streamed, 0);
    assert_eq!(on_y, off_y, "the outputs differ with and without streaming");
    // the GPU buffers (host memory on lavapipe), a read and its staging copy, the queue's 16 MiB upload window,
    // and 16 MiB for the run and the allocator
    let bound = weights + 2 * CHILD_CHUNK + (32 << 20);
    assert!(on < bound, "streaming: peak grew by {:.0} MiB (bound {:.0} MiB)", mib(on), mib(bound));
    assert!(off > on + weights / 2, "without streaming the peak grew by {:.0} MiB only", mib(off));
}
