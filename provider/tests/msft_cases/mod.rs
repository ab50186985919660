//! Shared by gpu_msft_attention.rs and gpu_norms.rs: `scripts/msft_ops_cases.py`'s one-node com.microsoft models
//! (built with the `onnx` package, outputs from the venv's onnxruntime) run on kiln's CPU and GPU.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln_provider::blocking::Session;
use kiln_provider::{Device, ExecutionProvider, SessionOptions};

use crate::common::*;

/// The cases of `families`, written by the script into a fresh folder; None (said loudly) without the venv.
pub fn msft_cases(families: &[&str]) -> Option<Vec<PathBuf>> {
    let python = workspace_root().join(".venv/bin/python");
    if !python.is_file() {
        eprintln!("\n!!!!!!!! SKIPPED: no Python venv at {} (scripts/test.sh makes it) !!!!!!!!\n", python.display());
        return None;
    }
    let dir = std::env::temp_dir().join(format!("kiln-msft-{}-{}", families.join("-"), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(&python)
        .arg(workspace_root().join("scripts/msft_ops_cases.py"))
        .arg(&dir)
        .args(families)
        .output()
        .expect("running scripts/msft_ops_cases.py");
    assert!(out.status.success(), "msft_ops_cases.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("the cases folder").map(|e| e.expect("a case").path()).collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases written");
    Some(cases)
}

thread_local! {
    /// An op (by name) each case must have on the GPU (the fused node a pass makes), when set.
    pub static REQUIRE_ON_GPU: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs one case on `ep` and compares every output with onnxruntime's at `tol` (relative to 1 + max|ref|).
/// Returns the failures, and for the GPU the ops of the nodes that stayed on the CPU.
pub fn run_case(case: &Path, ep: ExecutionProvider, tol: f64) -> (Vec<String>, Vec<String>) {
    let name = case.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let opts = SessionOptions { execution_providers: vec![ep], ..Default::default() };
    let session = Session::from_path(case.join("model.onnx"), &opts).unwrap_or_else(|e| panic!("{name}: loading: {e}"));
    if ep == ExecutionProvider::WebGpu {
        assert!(session.gpu_placement().is_some(), "{name}: not on the GPU: {:?}", session.provider_note());
        session.set_gpu_poison(true);
    }
    let set = case.join("test_data_set_0");
    let feeds = read_inputs(&session, &set);
    let expected = read_outputs(&session, &set);
    let outputs = session.run(feeds).unwrap_or_else(|e| panic!("{name} on {ep:?}: {e}"));
    let mut failures = vec![];
    for (out, want) in &expected {
        let got = outputs.get(out).unwrap_or_else(|| panic!("{name}: no output {out}"));
        let (diff, ref_max) = max_diff(&format!("{name}/{out}"), got, want);
        if diff > tol * (1.0 + ref_max) {
            failures.push(format!("{name}/{out} on {ep:?}: max|diff| {diff:.3e} (max|ref| {ref_max:.3})"));
        }
    }
    let gpu_ops: Vec<String> = session
        .gpu_placement()
        .map(|r| r.nodes.iter().filter(|n| n.device == Device::Gpu).map(|n| n.op.clone()).collect())
        .unwrap_or_default();
    if let Some(op) = REQUIRE_ON_GPU.with(|r| r.borrow().clone()) {
        if ep == ExecutionProvider::WebGpu && !gpu_ops.contains(&op) {
            failures.push(format!("{name}: no {op} node on the GPU ({gpu_ops:?})"));
        }
    }
    let cpu_ops = session
        .gpu_placement()
        .map(|r| r.nodes.iter().filter(|n| n.device == Device::Cpu).map(|n| n.op.clone()).collect())
        .unwrap_or_default();
    (failures, cpu_ops)
}

pub fn gpu_available(case: &Path) -> bool {
    let opts = SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() };
    let s = Session::from_path(case.join("model.onnx"), &opts).expect("loading");
    if s.gpu_placement().is_none() {
        let note = s.provider_note().unwrap_or_default();
        assert!(note.contains("no GPU adapter"), "{}: the GPU provider failed: {note}", case.display());
        eprintln!("\n!!!!!!!! SKIPPING THE GPU HALF: no GPU adapter ({note}) !!!!!!!!\n");
        return false;
    }
    true
}

/// Every case on the CPU against onnxruntime, then on the GPU against onnxruntime with no node whose op name
/// contains `fused` (the op of the fused kernel's node) left on the CPU.
pub fn check_family(family: &str, fused: &str) {
    let Some(cases) = msft_cases(&[family]) else { return };
    let mut failures = vec![];
    for case in &cases {
        failures.extend(run_case(case, ExecutionProvider::Cpu, 1e-4).0);
    }
    if gpu_available(&cases[0]) {
        for case in &cases {
            let (f, cpu_ops) = run_case(case, ExecutionProvider::WebGpu, 1e-4);
            failures.extend(f);
            if cpu_ops.iter().any(|op| op.contains(fused)) {
                failures.push(format!("{}: the fused op stayed on the CPU ({cpu_ops:?})", case.display()));
            }
            eprintln!("{}: on the CPU {cpu_ops:?}", case.file_name().unwrap_or_default().to_string_lossy());
        }
    }
    eprintln!("{family}: {} cases", cases.len());
    assert!(failures.is_empty(), "{family}:\n  {}", failures.join("\n  "));
}
