//! Prints the GPU kernels a model lowers to (one line per kernel name, with its count; views cost no dispatch) and
//! the nodes left on the CPU: `cargo run --release -p kiln-examples --example gpu_kernels -- MODEL.onnx`.
//! Uses the adapter-independent WebGPU default limits (no adapter needed).

use std::collections::BTreeMap;

use kiln_graph::lower_gpu::{lower, Device};
use kiln_graph::{LoadOptions, OptimizationLevel};
use kiln_wgsl::ops::GpuOp;
use kiln_wgsl::{Caps, Kernel};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: gpu_kernels MODEL.onnx");
        std::process::exit(2);
    };
    let options = LoadOptions { optimization: OptimizationLevel::Basic, ..Default::default() };
    let model = match kiln_graph::load_path(&path, &options) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if std::env::args().any(|a| a == "--dump") {
        for n in model.typed.nodes() {
            let ins: Vec<String> = n.inputs.iter().map(|i| format!("{}/{}", i.node, i.slot)).collect();
            println!("{} {} {} <- {:?} : {:?}", n.id, n.name, n.op.name(), ins, n.outputs[0].fact);
        }
    }
    let lowered = match lower(&model.typed, &Caps::webgpu_defaults()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let mut kernels: BTreeMap<String, usize> = BTreeMap::new();
    let mut dispatching = 0;
    for n in lowered.model.nodes() {
        if let Some(g) = n.op_as::<GpuOp>() {
            *kernels.entry(g.kernel.name()).or_default() += 1;
            if !matches!(g.kernel, Kernel::View(_)) {
                dispatching += 1;
            }
        }
    }
    println!("dispatching GPU nodes: {dispatching}");
    for (k, n) in &kernels {
        println!("  {n:4} {k}");
    }
    let mut cpu: BTreeMap<String, usize> = BTreeMap::new();
    for p in lowered.placement.iter().filter(|p| p.device == Device::Cpu) {
        *cpu.entry(format!("{} ({})", p.op, p.reason.clone().unwrap_or_default())).or_default() += 1;
    }
    println!("on the CPU: {cpu:?}");
}
