//! kiln-gpu-bench: kernel throughput of kiln's WebGPU backend against the adapter's own ceiling.
//!
//!   kiln-gpu-bench [--matmul S] [--matvec K] [--elementwise N] [--chain C] [--runs R] [--copy MIB]
//!
//! Each kernel runs as a chain of identical nodes in one ONNX model through a kiln `Session` on the webgpu
//! provider (one submit per run, the weight uploaded once). A chain of C and one of 2·C nodes are timed, and the
//! per-kernel time is their difference / C, so the run's fixed costs (upload of the input, readback of the output,
//! host conversions) cancel out. Printed:
//! - MatMul S×S·S×S f32 (tiled kernel): GFLOP/s = 2·S³ / per-kernel time.
//! - MatMul 1×K·K×K f32 (matrix-vector kernel, the decode shape): GB/s = weight bytes (4·K²) / per-kernel time.
//! - Mul of two N-element f32 tensors (elementwise): GB/s = 12·N bytes (two reads, one write) / per-kernel time.
//! - The ceiling: `copy_buffer_to_buffer` of a MIB-MiB buffer, counted as read + write (2·size per copy).
//!
//! Elementwise fusion is switched off (KILN_GPU_FUSION=0) so that each node is its own dispatch.
//! Defaults depend on the adapter (a CPU adapter such as lavapipe gets small sizes). The median of R runs is used.
use std::time::{Duration, Instant};

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, SessionOptions, Tensor};
use prost::Message;

type BoxError = Box<dyn std::error::Error>;

fn value_info(name: &str, dims: &[usize]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|v| pb::tensor_shape_proto::Dimension { value: Some(DimValue::DimValue(*v as i64)), ..Default::default() })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// x → op(x, w) → op(·, w) → … (`chain` nodes), `w` an f32 initializer of `w_dims` (small random values).
fn chain_model(op: &str, x_dims: &[usize], w_dims: &[usize], chain: usize) -> Vec<u8> {
    let n: usize = w_dims.iter().product();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut raw = Vec::with_capacity(n * 4);
    for _ in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // near 1/√K so a MatMul chain neither explodes nor vanishes; near 1 for Mul
        let u = (state >> 40) as f32 / (1u64 << 24) as f32;
        let v = if op == "MatMul" { (u - 0.5) * 2.0 * (3.0 / w_dims[0] as f32).sqrt() } else { 0.999 + u * 0.002 };
        raw.extend_from_slice(&v.to_le_bytes());
    }
    let w = pb::TensorProto {
        name: "w".into(),
        dims: w_dims.iter().map(|d| *d as i64).collect(),
        data_type: 1,
        raw_data: raw,
        ..Default::default()
    };
    let mut nodes = vec![];
    let mut prev = "x".to_string();
    for i in 0..chain {
        let out = if i + 1 == chain { "y".to_string() } else { format!("t{i}") };
        nodes.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}{i}"),
            input: vec![prev.clone(), "w".into()],
            output: vec![out.clone()],
            ..Default::default()
        });
        prev = out;
    }
    let mut y_dims = x_dims.to_vec();
    if op == "MatMul" {
        *y_dims.last_mut().unwrap_or(&mut 0) = w_dims[1];
    }
    let graph = pb::GraphProto {
        name: "bench".into(),
        node: nodes,
        initializer: vec![w],
        input: vec![value_info("x", x_dims)],
        output: vec![value_info("y", &y_dims)],
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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Seconds per kernel: (median run of a 2·`chain`-node model − that of a `chain`-node one) / `chain`.
fn time_kernel(op: &str, x_dims: &[usize], w_dims: &[usize], chain: usize, runs: usize) -> Result<f64, BoxError> {
    let short = time_run(op, x_dims, w_dims, chain, runs)?;
    let long = time_run(op, x_dims, w_dims, 2 * chain, runs)?;
    Ok((long - short).max(1e-9) / chain as f64)
}

/// Median seconds per run of a `chain`-node model, after one warm-up run; checks the whole chain ran on the GPU.
fn time_run(op: &str, x_dims: &[usize], w_dims: &[usize], chain: usize, runs: usize) -> Result<f64, BoxError> {
    let bytes = chain_model(op, x_dims, w_dims, chain);
    let options = SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() };
    let session = Session::from_bytes(&bytes, &options)?;
    if session.execution_provider() != ExecutionProvider::WebGpu {
        return Err(format!("no GPU adapter: {:?}", session.provider_note()).into());
    }
    let n: usize = x_dims.iter().product();
    let x = Tensor::from_vec(x_dims, (0..n).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect::<Vec<f32>>())?;
    session.run([("x", x.clone())])?;
    if let Some(report) = session.gpu_placement() {
        let cpu: Vec<_> = report.nodes.iter().filter(|p| p.reason.is_some()).map(|p| p.node.clone()).collect();
        if !cpu.is_empty() {
            return Err(format!("{op}: nodes on the CPU: {cpu:?}").into());
        }
    }
    let mut times = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        let out = session.run([("x", x.clone())])?;
        let y: Vec<f32> = out.output("y")?.to_vec()?;
        times.push(t.elapsed());
        if y.iter().any(|v| !v.is_finite()) {
            return Err(format!("{op}: non-finite output").into());
        }
    }
    Ok(median(times).as_secs_f64())
}

/// Seconds per `copy_buffer_to_buffer` of `bytes`: (median submit of 2·`reps` copies − one of `reps`) / `reps`.
fn time_copy(bytes: u64, reps: usize, runs: usize) -> Result<(String, f64), BoxError> {
    use kiln_wgsl::wgpu;
    let ctx = pollster::block_on(kiln_wgsl::Context::new())?.ok_or("no GPU adapter")?;
    let bytes = bytes.min(ctx.caps.max_buffer_size) / 4 * 4;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let a = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage,
        mapped_at_creation: false,
    });
    let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage,
        mapped_at_creation: false,
    });
    let mut medians = vec![];
    for count in [reps, 2 * reps] {
        let mut times = vec![];
        for run in 0..=runs {
            let t = Instant::now();
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            for i in 0..count {
                let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                enc.copy_buffer_to_buffer(src, 0, dst, 0, bytes);
            }
            ctx.queue.submit([enc.finish()]);
            ctx.device.poll(wgpu::PollType::wait_indefinitely())?;
            if run > 0 {
                times.push(t.elapsed());
            }
        }
        medians.push(median(times).as_secs_f64());
    }
    ctx.take_error()?;
    let name = format!("{} ({})", ctx.caps.adapter, ctx.caps.backend);
    Ok((name, (medians[1] - medians[0]).max(1e-9) / reps as f64))
}

fn arg(args: &[String], name: &str) -> Result<Option<usize>, BoxError> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args.get(i + 1).ok_or_else(|| format!("{name} needs a value"))?;
            Ok(Some(v.parse().map_err(|_| format!("{name}: not a number: {v}"))?))
        }
    }
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // one dispatch per node: the elementwise fusion pass would merge a chain of Muls into one kernel
    std::env::set_var("KILN_GPU_FUSION", "0");
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("kiln-gpu-bench [--matmul S] [--matvec K] [--elementwise N] [--chain C] [--runs R] [--copy MIB]");
        return Ok(());
    }
    let runs = arg(&args, "--runs")?.unwrap_or(5).max(1);
    let copy_mib = arg(&args, "--copy")?.unwrap_or(256) as u64;
    let (adapter, copy_s) = time_copy(copy_mib << 20, 8, runs)?;
    let cpu_adapter = adapter.contains("llvmpipe") || adapter.contains("SwiftShader");
    let (s_def, k_def, n_def, c_def) = if cpu_adapter { (512, 2048, 1 << 22, 8) } else { (4096, 8192, 1 << 25, 64) };
    let s = arg(&args, "--matmul")?.unwrap_or(s_def);
    let k = arg(&args, "--matvec")?.unwrap_or(k_def);
    let n = arg(&args, "--elementwise")?.unwrap_or(n_def);
    let chain = arg(&args, "--chain")?.unwrap_or(c_def).max(1);
    let copy_bytes = ((copy_mib << 20) / 4 * 4) as f64;
    let ceiling = 2.0 * copy_bytes / copy_s / 1e9;
    println!(
        "adapter: {adapter}; median of {runs} runs; per kernel = (run of {} nodes - run of {chain}) / {chain}",
        2 * chain
    );
    println!("{:<44} {:>12} {:>12}", "kernel", "per kernel", "rate");
    println!(
        "{:<44} {:>9.3} ms {:>8.1} GB/s  (ceiling)",
        format!("copy_buffer_to_buffer {copy_mib} MiB"),
        copy_s * 1e3,
        ceiling
    );
    let t = time_kernel("MatMul", &[s, s], &[s, s], chain, runs)?;
    let gflops = 2.0 * (s as f64).powi(3) / t / 1e9;
    println!("{:<44} {:>9.3} ms {:>8.1} GFLOP/s", format!("MatMul {s}x{s}·{s}x{s} f32 (tiled)"), t * 1e3, gflops);
    let t = time_kernel("MatMul", &[1, k], &[k, k], chain, runs)?;
    let gbs = 4.0 * (k as f64).powi(2) / t / 1e9;
    println!(
        "{:<44} {:>9.3} ms {:>8.1} GB/s  ({:.0}% of copy)",
        format!("MatMul 1x{k}·{k}x{k} f32 (matvec)"),
        t * 1e3,
        gbs,
        100.0 * gbs / ceiling
    );
    let t = time_kernel("Mul", &[n], &[n], chain, runs)?;
    let gbs = 12.0 * n as f64 / t / 1e9;
    println!(
        "{:<44} {:>9.3} ms {:>8.1} GB/s  ({:.0}% of copy)",
        format!("Mul {n} f32 (elementwise)"),
        t * 1e3,
        gbs,
        100.0 * gbs / ceiling
    );
    Ok(())
}
