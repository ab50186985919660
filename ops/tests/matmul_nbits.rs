//! kiln's com.microsoft MatMulNBits against onnxruntime 1.32 CPU on the one-node models `data/make_matmul_nbits.py`
//! writes: block sizes 16/32/64/128, a partial last block, packed and float zero points, bias, float16, 8 bits,
//! accuracy_level 0 (exact f32) and 4 (onnxruntime's int8 activations, which kiln reproduces).

use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::prelude::*;

fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    kiln_ops::register(&mut onnx.op_register);
    onnx
}

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(file)
}

fn read_tensor(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let proto = tract_onnx::pb::TensorProto::decode(&*bytes).expect("TensorProto");
    tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, &proto, None).expect("tensor")
}

fn f32s(t: &Tensor) -> Vec<f32> {
    let t = t.cast_to::<f32>().unwrap().into_owned();
    let view = t.try_as_plain_ram().unwrap();
    view.as_slice::<f32>().unwrap().to_vec()
}

/// Runs `matmul_nbits_<case>.onnx` typed and optimised; max |diff| must stay within `rel` · max |reference|.
fn check(case: &str, rel: f32) {
    let onnx = framework();
    let model = onnx.model_for_path(data(&format!("matmul_nbits_{case}.onnx"))).expect("model");
    let a = read_tensor(&data(&format!("matmul_nbits_{case}_input_0.pb")));
    let want = read_tensor(&data(&format!("matmul_nbits_{case}_output_0.pb")));
    for level in ["typed", "optimized"] {
        let mut typed = model.clone().into_typed().expect("typed");
        if level == "optimized" {
            typed = typed.into_optimized().expect("optimized");
        }
        let plan = typed.into_runnable().expect("runnable");
        let got = plan.run(tvec!(a.clone().into_tvalue())).expect("run").remove(0).into_tensor();
        assert_eq!(got.datum_type(), want.datum_type(), "{case} ({level}): type");
        assert_eq!(got.shape(), want.shape(), "{case} ({level}): shape");
        let (g, w) = (f32s(&got), f32s(&want));
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(worst <= rel * max, "{case} ({level}): max |diff| {worst:e} > {rel} · {max}");
    }
}

#[test]
fn q4_block32() {
    check("q4_bs32", 1e-5);
}

#[test]
fn q4_block32_accuracy_level4_int8_activations() {
    check("q4_bs32_acc4", 1e-5);
}

#[test]
fn q4_block16_packed_zero_points_bias_partial_block() {
    check("q4_bs16_zp_bias", 1e-5);
}

#[test]
fn q4_block16_packed_zero_points_bias_accuracy_level4() {
    check("q4_bs16_zp_bias_acc4", 1e-5);
}

#[test]
fn q4_block128_float_zero_points() {
    check("q4_bs128_float_zp_acc4", 1e-5);
}

#[test]
fn q4_block32_float16_accuracy_level4() {
    // float16 output: one rounding away
    check("q4_bs32_f16_acc4", 1e-3);
}

#[test]
fn q4_block64_float16_zero_points_bias() {
    check("q4_bs64_f16_zp_bias", 1e-3);
}

#[test]
fn q8_block32_zero_points() {
    check("q8_bs32", 1e-5);
}

#[test]
fn q4_rank2_input() {
    check("q4_bs32_rank2", 1e-5);
}

#[test]
fn g_idx_is_refused_with_a_clear_error() {
    let err = framework().model_for_path(data("matmul_nbits_g_idx.onnx")).expect_err("g_idx must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("g_idx") && msg.contains("not supported"), "unexpected error: {msg}");
}

/// The dequantization itself, on a hand-made 4-bit block (no onnxruntime involved).
#[test]
fn dequantize_hand_made_block() {
    use kiln_ops::matmul_nbits::{MatMulNBits, ZeroPoints};
    let op = MatMulNBits {
        label: "t".into(),
        k: 3,
        n: 2,
        bits: 4,
        block_size: 16,
        int8_activations: false,
        zero_points: None,
        bias: None,
    };
    // column 0: codes 1, 2, 3; column 1: codes 15, 0, 8; one block each (8 bytes of blob)
    let mut b = vec![0u8; 16];
    b[0] = 0x21;
    b[1] = 0x03;
    b[8] = 0x0f;
    b[9] = 0x08;
    let w = op.dequantize_kn(&b, &[1.0, 0.5], ZeroPoints::Default).unwrap();
    // [K, N] row-major, zero point 8
    assert_eq!(w, vec![-7.0, 3.5, -6.0, -4.0, -5.0, 0.0]);
    let w = op.dequantize_kn(&b, &[1.0, 0.5], ZeroPoints::Packed(&[0x01, 0x0f])).unwrap();
    assert_eq!(w, vec![0.0, 0.0, 1.0, -7.5, 2.0, -3.5]);
    assert!(op.dequantize_kn(&b[..15], &[1.0, 0.5], ZeroPoints::Default).is_err());
    assert!(op.dequantize_kn(&b, &[1.0], ZeroPoints::Default).is_err());
}
