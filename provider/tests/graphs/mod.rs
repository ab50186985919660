//! Small ONNX graphs built in memory for the GPU infrastructure tests (weights, splitting), with a seeded RNG.
#![allow(dead_code)]

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, SessionOptions, Tensor};
use prost::Message;

/// The seed of a test's random inputs: KILN_TEST_SEED when set (to replay a failure), else the clock; printed with
/// `what`. Odd (a valid xorshift state).
pub fn seed_for(what: &str) -> u64 {
    let s = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{what}: seed {s} (KILN_TEST_SEED={s} to replay)");
    s | 1
}

/// [`seed_for`] the calling test file.
#[track_caller]
pub fn seed() -> u64 {
    seed_for(std::panic::Location::caller().file())
}

/// xorshift64: the tests' reproducible random numbers.
pub struct Rng(pub u64);
impl Rng {
    pub fn seeded(what: &str) -> Rng {
        Rng(seed_for(what))
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u32
    }
    /// Uniform in [0, 1).
    pub fn next(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    /// Uniform in [lo, hi), never exactly zero.
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let v = lo + (hi - lo) * self.next();
        if v == 0.0 {
            0.25
        } else {
            v
        }
    }
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next() as f64 * n as f64) as usize).min(n.saturating_sub(1))
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.range(-1.0, 1.0)).collect()
    }
}

/// [`value_info`] of fixed dims (`None`: no shape).
pub fn fixed_value_info(name: &str, elem_type: i32, dims: Option<&[usize]>) -> pb::ValueInfoProto {
    let dims: Option<Vec<Option<usize>>> = dims.map(|d| d.iter().map(|&x| Some(x)).collect());
    value_info(name, elem_type, dims.as_deref())
}

/// A tensor value info; `dims` entries `None` are symbolic (named `name_d{i}`).
pub fn value_info(name: &str, elem_type: i32, dims: Option<&[Option<usize>]>) -> pb::ValueInfoProto {
    let shape = dims.map(|d| pb::TensorShapeProto {
        dim: d
            .iter()
            .enumerate()
            .map(|(i, v)| pb::tensor_shape_proto::Dimension {
                value: Some(match v {
                    Some(v) => DimValue::DimValue(*v as i64),
                    None => DimValue::DimParam(format!("{name}_d{i}")),
                }),
                ..Default::default()
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(TypeValue::TensorType(pb::type_proto::Tensor { elem_type, shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An f32 initializer as raw little-endian bytes (how exporters store big weights).
pub fn f32_init(name: &str, dims: &[usize], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        i: v,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

pub fn model(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    inits: Vec<pb::TensorProto>,
) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "g".into(),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: inits,
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

pub fn options(ep: ExecutionProvider) -> SessionOptions {
    SessionOptions { execution_providers: vec![ep], ..Default::default() }
}

/// Whether this machine has a GPU adapter (a loud message when not).
pub fn gpu_available() -> bool {
    let bytes = model(
        vec![node("Relu", &["x"], "y", vec![])],
        vec![value_info("x", 1, Some(&[Some(2)]))],
        vec![value_info("y", 1, None)],
        vec![],
    );
    let s = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("loading");
    if s.execution_provider() != ExecutionProvider::WebGpu {
        let note = s.provider_note().unwrap_or_default();
        assert!(note.contains("no GPU adapter"), "the GPU provider failed: {note}");
        eprintln!(
            "\n!!!!!!!! SKIPPING GPU TESTS: no GPU adapter on this machine ({:?}). \
             Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n",
            s.provider_note()
        );
        return false;
    }
    true
}

/// Asserts two f32 tensors are equal within `atol + rtol·|want|`, elementwise.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: dims");
    let (g, w) = (got.to_vec::<f32>().expect("f32"), want.to_vec::<f32>().expect("f32"));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}: element {i}: gpu {a} vs cpu {b}");
    }
}
