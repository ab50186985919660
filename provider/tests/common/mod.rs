//! Helpers shared by kiln-provider's integration tests: fixture paths, TensorProto test data, comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln_provider::{blocking, ElementType, Tensor};

/// The workspace root (provider/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `conformance/fixtures/tiny` in the workspace.
pub fn tiny_fixtures() -> PathBuf {
    workspace_root().join("conformance/fixtures/tiny")
}

/// `../shared/models` beside the workspace.
pub fn shared_models() -> PathBuf {
    workspace_root().join("../shared/models")
}

/// Reads one serialized TensorProto file.
pub fn read_tensor(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Tensor::from_onnx_proto(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display())).1
}

/// The feeds of an ONNX backend-test data set (`input_j.pb` in the session's input order).
pub fn read_inputs(session: &blocking::Session, set: &Path) -> Vec<(String, Tensor)> {
    session
        .inputs()
        .iter()
        .enumerate()
        .map(|(j, info)| (info.name.clone(), read_tensor(&set.join(format!("input_{j}.pb")))))
        .collect()
}

/// The expected outputs of a data set (`output_j.pb` in the session's output order).
pub fn read_outputs(session: &blocking::Session, set: &Path) -> Vec<(String, Tensor)> {
    session
        .outputs()
        .iter()
        .enumerate()
        .map(|(j, info)| (info.name.clone(), read_tensor(&set.join(format!("output_{j}.pb")))))
        .collect()
}

/// max |a - b| and max |b| over two tensors of the same element type and dims.
pub fn max_diff(name: &str, got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.element_type(), want.element_type(), "{name}: element type");
    assert_eq!(got.dims(), want.dims(), "{name}: dims");
    let a = got.to_f64_vec().expect("numeric output");
    let b = want.to_f64_vec().expect("numeric reference");
    let mut diff = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        assert!(!d.is_nan() || (x.is_nan() && y.is_nan()), "{name}: NaN mismatch");
        if d > diff {
            diff = d;
        }
    }
    (diff, b.iter().fold(0f64, |m, y| m.max(y.abs())))
}

/// How close an output must be to its reference.
#[derive(Debug, Clone, Copy)]
pub enum Tolerance {
    /// max |diff| <= atol
    Abs(f64),
    /// max |diff| <= rel * max |reference|
    RelToMax(f64),
}

impl Tolerance {
    pub fn bound(&self, ref_max: f64) -> f64 {
        match self {
            Tolerance::Abs(a) => *a,
            Tolerance::RelToMax(r) => r * ref_max,
        }
    }
}

/// The f32 values of a float tensor (float16 converted).
pub fn f32_values(t: &Tensor) -> Vec<f32> {
    match t.element_type() {
        ElementType::F32 => t.to_vec::<f32>().expect("f32"),
        _ => t.to_f64_vec().expect("numeric").into_iter().map(|v| v as f32).collect(),
    }
}

/// A GPU session that fell back to the CPU may skip its test only when the machine has no GPU adapter: a lowering
/// or device failure on a machine with one (the provider note says which) fails it.
pub fn assert_no_gpu_adapter(note: Option<&str>) {
    assert!(note.is_some_and(|n| n.contains("no GPU adapter")), "the GPU did not take the model: {note:?}");
}
