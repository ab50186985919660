//! Helpers of the streaming tests (gpu_stream.rs, gpu_stream_split.rs): models rewritten with their initializers
//! in external data, a data source that records its reads, and the fixture check.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::common::*;
use crate::graphs::*;
use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, ExternalDataResolver, InMemoryResolver, SessionOptions, WeightStreaming};
use prost::Message;

/// Each tensor moved to external data: (offset, length) by name.
pub type Moved = HashMap<String, (u64, u64)>;

/// An in-memory data source that records each range read: (location, offset, length).
#[derive(Default)]
pub struct Recording {
    pub inner: InMemoryResolver,
    pub reads: Mutex<Vec<(String, u64, u64)>>,
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
pub fn externalize(model: &[u8], min: usize) -> (Vec<u8>, Vec<u8>, Moved) {
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

pub fn gpu_options(source: Arc<Recording>, min_bytes: u64, chunk_bytes: u64) -> SessionOptions {
    SessionOptions {
        execution_providers: vec![ExecutionProvider::WebGpu],
        external_data: Some(source),
        weight_streaming: WeightStreaming { enabled: true, min_bytes, chunk_bytes },
        ..Default::default()
    }
}

pub fn cpu_options(source: Arc<Recording>) -> SessionOptions {
    SessionOptions { external_data: Some(source), ..options(ExecutionProvider::Cpu) }
}

pub fn recording(data: Vec<u8>) -> Arc<Recording> {
    Arc::new(Recording { inner: InMemoryResolver::new().with_file("weights.bin", data), ..Default::default() })
}

/// Checks the reads of a streaming load: none over `chunk`, and each moved tensor of at least `min` bytes read
/// exactly once, range by range (`streamed` of them were streamed to the GPU).
pub fn check_reads(what: &str, source: &Recording, moved: &Moved, min: u64, chunk: u64) {
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
        // the GPU copy and, for a float16 weight a gather reads as is, its float32 view: each a full read; a
        // gathered float32 table may also have one or two rows (at most 4 KiB each) sampled at import (is it a
        // rotary cache?)
        let (full, rest) = (total / length, total % length);
        assert!(
            (1..=2).contains(&full) && rest <= 8192,
            "{what}: `{name}` ({length} bytes) read {total} bytes in {} ranges",
            covered.len()
        );
    }
}

/// Where [`fixture`] keeps the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Moved to an external data file ([`externalize`]).
    External,
    /// Inline, as the fixture is: one file, whose large initializers kiln_graph::skeleton leaves in it.
    SingleFile,
}

/// Each initializer of at least `min` bytes of raw data, found in the model's bytes: (offset, length) by name.
pub fn raw_data_in_file(bytes: &[u8], min: usize) -> Moved {
    let proto = pb::ModelProto::decode(bytes).expect("decoding the fixture");
    let mut found = HashMap::new();
    for t in &proto.graph.as_ref().expect("a graph").initializer {
        if t.raw_data.len() < min {
            continue;
        }
        let at = bytes.windows(t.raw_data.len()).position(|w| w == t.raw_data).expect("the raw data in the file");
        found.insert(t.name.clone(), (at as u64, t.raw_data.len() as u64));
    }
    found
}

/// A fixture through the streaming import on the GPU, against onnxruntime's outputs and the CPU session.
pub fn fixture(model: &str, tolerance: f64) {
    fixture_as(model, tolerance, Layout::External)
}

pub fn fixture_as(model: &str, tolerance: f64, layout: Layout) {
    if !gpu_available() {
        return;
    }
    let dir = tiny_fixtures().join(model);
    let bytes = std::fs::read(dir.join("model.onnx")).expect("reading the fixture");
    let (min, chunk) = (4096u64, 4096u64);
    let (ext, data, moved) = match layout {
        Layout::External => externalize(&bytes, 1024),
        Layout::SingleFile => (bytes.clone(), bytes.clone(), raw_data_in_file(&bytes, 1024)),
    };
    let source = match layout {
        Layout::External => recording(data.clone()),
        Layout::SingleFile => Arc::new(Recording {
            inner: InMemoryResolver::new().with_file(kiln_provider::MODEL_ITSELF, bytes.clone()),
            ..Default::default()
        }),
    };
    let session = match layout {
        Layout::External => Session::from_bytes(&ext, &gpu_options(source.clone(), min, chunk)),
        Layout::SingleFile => {
            Session::from_source(source.clone(), bytes.len() as u64, &gpu_options(source.clone(), min, chunk))
        }
    }
    .unwrap_or_else(|e| panic!("{model}: loading with streaming: {e}"));
    assert_eq!(session.execution_provider(), ExecutionProvider::WebGpu, "{model}: {:?}", session.provider_note());
    let report = session.gpu_placement().expect("a GPU session's report");
    // an attention's output projection (MatMul B after Reshape(Transpose(..))) is read into memory (tract folds
    // the heads' transpose into its rows at load)
    let proto = pb::ModelProto::decode(&*bytes).expect("decoding the fixture");
    let graph = proto.graph.as_ref().expect("a graph");
    let producer = |name: &str| graph.node.iter().find(|n| n.output.iter().any(|o| o == name));
    let merged_heads = |name: &str| {
        graph.node.iter().any(|n| {
            n.op_type == "MatMul"
                && n.input.get(1).is_some_and(|i| i == name)
                && producer(&n.input[0]).is_some_and(|r| {
                    r.op_type == "Reshape" && producer(&r.input[0]).is_some_and(|t| t.op_type == "Transpose")
                })
        })
    };
    let big: Vec<(&String, u64)> =
        moved.iter().filter(|m| m.1 .1 >= min && !merged_heads(m.0)).map(|m| (m.0, m.1 .1)).collect();
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
