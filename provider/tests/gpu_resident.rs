//! GPU-resident IO across runs: `present.*` left on the GPU (`preferredOutputLocation: 'gpu-buffer'`) and fed back
//! as the next step's `past_key_values.*`, the KV append in place in a store with spare rows. Every step's logits
//! against the same loop on the CPU provider (1e-4), and the session's counters: a decode step uploads only the
//! host feeds, reads back only the logits, and copies only the new K/V rows (plus, at a capacity growth, the old
//! rows once). Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use kiln_provider::wgpu;
use kiln_provider::{
    blocking, Counters, ElementType, ExecutionProvider, GpuTensor, Location, PreferredOutputLocation, RunOptions,
    SessionOptions, Tensor, Value,
};
use wgpu::util::DeviceExt;

fn gpu_session(model: &Path, prefs: PreferredOutputLocation) -> Option<blocking::Session> {
    let opts = SessionOptions {
        execution_providers: vec![ExecutionProvider::WebGpu],
        preferred_output_location: prefs,
        // float16 models append their cache in place with the fused attention (kiln_graph::passes::
        // f16_fused_attention, the default; f32 models are unaffected by it)
        gpu_f16_fused_attention: Some(true),
        ..Default::default()
    };
    let s = blocking::Session::from_path(model, &opts).unwrap_or_else(|e| panic!("{}: loading: {e}", model.display()));
    if s.gpu_placement().is_none() {
        assert_no_gpu_adapter(s.provider_note());
        eprintln!(
            "\n!!!!!!!! SKIPPING {} ON THE GPU: no GPU adapter ({:?}). \
             Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n",
            model.display(),
            s.provider_note()
        );
        return None;
    }
    Some(s)
}

fn cpu_session(model: &Path) -> blocking::Session {
    let opts = SessionOptions { execution_providers: vec![ExecutionProvider::Cpu], ..Default::default() };
    blocking::Session::from_path(model, &opts).unwrap_or_else(|e| panic!("{}: loading: {e}", model.display()))
}

fn counters(s: &blocking::Session) -> Counters {
    s.gpu_placement().map(|r| r.counters).unwrap_or_default()
}

/// `after - before`, field by field (totals over the session's runs).
fn delta(a: &Counters, b: &Counters) -> Counters {
    Counters {
        submits: a.submits - b.submits,
        early_submits: a.early_submits - b.early_submits,
        dispatches: a.dispatches - b.dispatches,
        uploads: a.uploads - b.uploads,
        readbacks: a.readbacks - b.readbacks,
        buffers_created: a.buffers_created - b.buffers_created,
        buffer_bytes: a.buffer_bytes.wrapping_sub(b.buffer_bytes),
        arena_bytes: a.arena_bytes,
        reused_in_flush: a.reused_in_flush - b.reused_in_flush,
        bind_groups_created: a.bind_groups_created - b.bind_groups_created,
        upload_bytes: a.upload_bytes - b.upload_bytes,
        readback_bytes: a.readback_bytes - b.readback_bytes,
        gpu_feeds: a.gpu_feeds - b.gpu_feeds,
        gpu_outputs: a.gpu_outputs - b.gpu_outputs,
        kv_appends_in_place: a.kv_appends_in_place - b.kv_appends_in_place,
        kv_appends_fused: a.kv_appends_fused - b.kv_appends_fused,
        rotations_in_matmul: a.rotations_in_matmul - b.rotations_in_matmul,
        kv_append_bytes: a.kv_append_bytes - b.kv_append_bytes,
        kv_stores_created: a.kv_stores_created - b.kv_stores_created,
        kv_grow_bytes: a.kv_grow_bytes - b.kv_grow_bytes,
        kv_compact_bytes: a.kv_compact_bytes - b.kv_compact_bytes,
        submit_us: a.submit_us - b.submit_us,
        wait_us: a.wait_us - b.wait_us,
        run_us: a.run_us - b.run_us,
    }
}

fn is_past(name: &str) -> bool {
    name.starts_with("past_key_values") || name.starts_with("past_key") || name.starts_with("past_value")
}

/// The `present.*` output a `past_key_values.*` input comes from (`past_key_values.3.key` → `present.3.key`).
fn present_for(past: &str, outputs: &[String]) -> String {
    let want = past.replacen("past_key_values", "present", 1);
    assert!(outputs.contains(&want), "no output {want} for {past} in {outputs:?}");
    want
}

fn int_tensor(et: ElementType, dims: &[usize], v: Vec<i64>) -> Tensor {
    match et {
        ElementType::I64 => Tensor::from_vec(dims, v).unwrap(),
        ElementType::I32 => Tensor::from_vec(dims, v.into_iter().map(|x| x as i32).collect()).unwrap(),
        other => panic!("integer feed of type {other}"),
    }
}

fn argmax_last(logits: &Tensor) -> i64 {
    let v = f32_values(logits);
    let vocab = *logits.dims().last().unwrap();
    let last = &v[v.len() - vocab..];
    let mut best = 0;
    for (i, x) in last.iter().enumerate() {
        if *x > last[best] {
            best = i;
        }
    }
    best as i64
}

/// Feeds of one step: the prompt (or the last token), an all-ones mask, positions; the past from `past`.
fn step_feeds(
    session: &blocking::Session,
    ids: &[i64],
    past_len: usize,
    past: &HashMap<String, Value>,
) -> Vec<(String, Value)> {
    let mut feeds = vec![];
    for info in session.inputs() {
        let et = info.element_type.unwrap();
        let n = ids.len();
        let v: Value = match info.name.as_str() {
            "input_ids" => int_tensor(et, &[1, n], ids.to_vec()).into(),
            "attention_mask" => int_tensor(et, &[1, past_len + n], vec![1; past_len + n]).into(),
            "position_ids" => int_tensor(et, &[1, n], (past_len as i64..(past_len + n) as i64).collect()).into(),
            name if is_past(name) => past.get(name).unwrap_or_else(|| panic!("no past for {name}")).clone(),
            other => panic!("unexpected input {other}"),
        };
        feeds.push((info.name.clone(), v));
    }
    feeds
}

struct Loop {
    logits: Vec<Tensor>,
    steps: Vec<Counters>,
    tokens: Vec<i64>,
    /// Per step: how many present.* came back as GPU tensors.
    kv_on_gpu: Vec<usize>,
}

/// Prefill with `prompt`, then `steps` decode steps, each feeding the previous `present.*` back. The next token
/// is `forced[i]` when given (so two loops see the same tokens), else the argmax. `gpu_kv`: present.* stay on the
/// GPU and go back as GPU tensors.
fn run_loop(session: &blocking::Session, dir: &Path, prompt: &[i64], steps: usize, forced: Option<&[i64]>) -> Loop {
    run_loop_from(session, &dir.join("test_data_set_0"), prompt, steps, forced)
}

/// [`run_loop`] with the empty past of the data set `set0` (a prefill with an empty cache), which gives the
/// cache's dims and element type.
fn run_loop_from(
    session: &blocking::Session,
    set0: &Path,
    prompt: &[i64],
    steps: usize,
    forced: Option<&[i64]>,
) -> Loop {
    let dir = set0;
    let set0 = read_inputs(session, set0);
    let mut past: HashMap<String, Value> =
        set0.into_iter().filter(|(n, _)| is_past(n)).map(|(n, t)| (n, Value::Cpu(t))).collect();
    let outputs: Vec<String> = session.outputs().iter().map(|o| o.name.clone()).collect();
    let mut ids = prompt.to_vec();
    let mut past_len = 0;
    let mut out = Loop { logits: vec![], steps: vec![], tokens: vec![], kv_on_gpu: vec![] };
    for step in 0..=steps {
        let feeds = step_feeds(session, &ids, past_len, &past);
        let before = counters(session);
        let mut res = session.run(feeds).unwrap_or_else(|e| panic!("{}: step {step}: {e}", dir.display()));
        out.steps.push(delta(&counters(session), &before));
        let logits = res.take("logits").expect("logits on the host");
        let next = match forced {
            Some(f) => f[step],
            None => argmax_last(&logits),
        };
        out.tokens.push(next);
        out.logits.push(logits);
        let names: Vec<String> = past.keys().cloned().collect();
        out.kv_on_gpu.push(names.iter().filter(|n| res.gpu(&present_for(n, &outputs)).is_some()).count());
        for name in names {
            let v = res.take_value(&present_for(&name, &outputs)).expect("present output");
            past.insert(name, v);
        }
        past_len += ids.len();
        ids = vec![next];
    }
    // a KV store read back gives the exact logical tensor: the last present.* against the CPU's is checked by
    // the caller through `past`
    out
}

/// present.* on the GPU, the logits read back (onnxruntime-web's per-output form).
fn kv_prefs(session: &blocking::Session) -> PreferredOutputLocation {
    PreferredOutputLocation::PerOutput(
        session
            .outputs()
            .iter()
            .filter(|o| o.name.starts_with("present"))
            .map(|o| (o.name.clone(), Location::GpuBuffer))
            .collect(),
    )
}

const STEPS: usize = 24;

/// The f16 ulp at magnitude `v`: 2^(e - 10) for a normal f16 of exponent e, 2^-24 below the normals.
fn f16_ulp(v: f64) -> f64 {
    let v = v.abs();
    if v < 2f64.powi(-14) {
        2f64.powi(-24)
    } else {
        2f64.powi(v.log2().floor() as i32 - 10)
    }
}

/// How far the GPU's logits may be from the CPU provider's: 1e-4 for float32; for a float16 model (both compute in
/// float32 and round the logits to float16 once) 2 f16 ulps at the reference's largest magnitude: a float32
/// difference in the 6th digit may flip one rounding, a wrong value is off by far more.
fn logits_tolerance(logits: &Tensor, ref_max: f64) -> f64 {
    if logits.element_type() == ElementType::F16 {
        2.0 * f16_ulp(ref_max)
    } else {
        1e-4
    }
}

/// Bytes of one element of `t` on the GPU (f16: 2, the rest of these tests' types: 4).
fn elem_bytes(t: &Tensor) -> u64 {
    if t.element_type() == ElementType::F16 {
        2
    } else {
        4
    }
}

/// `fused_appends`: the model's rotations take their layer's KV appends along (Llama-style layers, f32 or float16
/// caches: kiln_graph's fuse_rotary_appends): every steady step's appends are written by the rotation's dispatch.
/// `in_matmul`: and the rotations are done by the layers' q / k / v matvecs (4-bit, fp32 or float16 projections:
/// fuse_qkv_rotations; with float16 caches the matvec also outputs v for the attention).
fn check(model: &str, fused_appends: bool, in_matmul: bool) {
    let dir = tiny_fixtures().join(model);
    let path = dir.join("model.onnx");
    let cpu = cpu_session(&path);
    let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let prefs = kv_prefs(&probe);
    drop(probe);
    let gpu = gpu_session(&path, prefs).expect("a GPU session");
    let prompt = [15i64, 230, 7, 99, 512, 3, 871];
    let reference = run_loop(&cpu, &dir, &prompt, STEPS, None);
    let got = run_loop(&gpu, &dir, &prompt, STEPS, Some(&reference.tokens));
    // logits of every step
    for (step, (g, c)) in got.logits.iter().zip(&reference.logits).enumerate() {
        let (diff, ref_max) = max_diff(&format!("{model} step {step} logits"), g, c);
        let tol = logits_tolerance(c, ref_max);
        assert!(diff <= tol, "{model}: step {step}: logits max|diff| {diff:.3e} > {tol:.3e} (max|ref| {ref_max:.3})");
    }
    // the counters of each decode step
    let kv_inputs = gpu.inputs().iter().filter(|i| is_past(&i.name)).count();
    let host_feeds = gpu.inputs().len() - kv_inputs;
    let logits_info = got.logits.last().unwrap();
    let logits_bytes = logits_info.len() as u64 * elem_bytes(logits_info);
    let kv0 = read_inputs(&gpu, &dir.join("test_data_set_0"));
    let (kv_name, kv_empty) = kv0.iter().find(|(n, _)| is_past(n)).unwrap();
    let d = kv_empty.dims();
    // one new row of one cache tensor, every (batch, head); a float16 model's cache stays float16 on the GPU
    let row_bytes = (d[0] * d[1] * d[3]) as u64 * elem_bytes(kv_empty);
    eprintln!("{model}: {kv_inputs} cache inputs ({kv_name} {d:?}), {host_feeds} host feeds");
    eprintln!("{model}: prefill {:?}", got.steps[0]);
    let mut growths = 0;
    let mut copied = 0u64;
    for (i, c) in got.steps.iter().enumerate().skip(1) {
        let past_len = prompt.len() + i - 1;
        eprintln!("{model}: step {i} (past {past_len}): {c:?}");
        assert_eq!(c.gpu_feeds, kv_inputs, "{model} step {i}: every cache input bound as a GPU tensor");
        assert_eq!(c.gpu_outputs, kv_inputs, "{model} step {i}: every present.* left on the GPU");
        assert_eq!(c.readbacks, 1, "{model} step {i}: only the logits read back");
        assert_eq!(c.readback_bytes, logits_bytes, "{model} step {i}: only the logits' bytes read back");
        // up: the host feeds (ids, mask, positions) and what CPU nodes make of them (the mask's expansions),
        // the same uploads every step and less than a single cache tensor (`row_bytes * past_len`)
        assert_eq!(c.uploads, got.steps[1].uploads, "{model} step {i}: the same uploads every step");
        let one_cache = row_bytes * past_len as u64;
        assert!(c.upload_bytes < one_cache, "{model} step {i}: {} bytes up (a cache: {one_cache})", c.upload_bytes);
        assert_eq!(c.kv_compact_bytes, 0, "{model} step {i}: a cache copied whole for a reader");
        assert_eq!(c.kv_append_bytes, kv_inputs as u64 * row_bytes, "{model} step {i}: only the new rows written");
        if c.kv_stores_created > 0 {
            // a capacity growth: the full store replaced by one twice its size, the old rows copied once
            growths += 1;
            assert_eq!(c.kv_stores_created, kv_inputs, "{model} step {i}");
            assert_eq!(c.kv_grow_bytes, kv_inputs as u64 * row_bytes * past_len as u64, "{model} step {i}");
            assert!(past_len.is_power_of_two(), "{model} step {i}: grew at {past_len} rows");
        } else {
            assert_eq!(c.kv_appends_in_place, kv_inputs, "{model} step {i}: appends in place");
            let fused = if fused_appends { kv_inputs } else { 0 };
            assert_eq!(c.kv_appends_fused, fused, "{model} step {i}: appends written by the rotations");
            let in_mm = if in_matmul { kv_inputs / 2 } else { 0 };
            assert_eq!(c.rotations_in_matmul, in_mm, "{model} step {i}: rotations done by the q/k/v matvecs");
            assert_eq!(c.kv_grow_bytes, 0, "{model} step {i}");
            // the same allocations as the step before get the same buffers: every bind group comes from the cache
            // (after a growth the new stores are bound anew, by the step itself and, float16 caches, the next)
            if i >= 2 && got.steps[i - 1].kv_stores_created == 0 {
                assert_eq!(c.bind_groups_created, 0, "{model} step {i}: bind groups made in a steady step");
            }
        }
        copied += c.kv_append_bytes + c.kv_grow_bytes + c.kv_compact_bytes;
    }
    assert!(growths >= 1, "{model}: the test must cross a capacity growth");
    // before: the same loop with every output read back ('cpu', the default) uploads and reads back the caches
    let plain = gpu_session(&path, PreferredOutputLocation::default()).expect("a GPU session");
    let base = run_loop(&plain, &dir, &prompt, 3, Some(&reference.tokens));
    for (step, (g, c)) in base.logits.iter().zip(&reference.logits).enumerate() {
        let (diff, ref_max) = max_diff(&format!("{model} step {step} logits (cpu location)"), g, c);
        let tol = logits_tolerance(c, ref_max);
        assert!(diff <= tol, "{model}: step {step} (cpu location): logits max|diff| {diff:.3e} > {tol:.3e}");
    }
    let (b, r) = (&base.steps[3], &got.steps[3]);
    eprintln!(
        "{model}: decode step (past {}): cpu location: {} uploads / {} B up, {} readbacks / {} B down; \
         gpu-buffer KV: {} uploads / {} B up, {} readbacks / {} B down, {} B written in the caches",
        prompt.len() + 2,
        b.uploads,
        b.upload_bytes,
        b.readbacks,
        b.readback_bytes,
        r.uploads,
        r.upload_bytes,
        r.readbacks,
        r.readback_bytes,
        r.kv_append_bytes + r.kv_grow_bytes + r.kv_compact_bytes
    );
    assert_eq!(b.readbacks, 1 + kv_inputs, "{model}: the cpu-location loop reads back every present.*");
    assert!(b.upload_bytes >= r.upload_bytes + kv_inputs as u64 * row_bytes * (prompt.len() + 2) as u64);
    // amortised O(new tokens): everything the decode steps copied is within 3x the rows they added
    let added = (STEPS * kv_inputs) as u64 * row_bytes;
    assert!(copied <= 3 * added, "{model}: {copied} bytes copied for {added} bytes of new rows");
    eprintln!("{model}: {STEPS} decode steps: {copied} bytes copied in the caches for {added} bytes of new rows");
}

/// The last step's present.* read back from its KV store equal the CPU's (exact logical tensor).
fn check_readback(model: &str) {
    let dir = tiny_fixtures().join(model);
    let path = dir.join("model.onnx");
    let cpu = cpu_session(&path);
    let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let prefs = kv_prefs(&probe);
    drop(probe);
    let gpu = gpu_session(&path, prefs).expect("a GPU session");
    let set0 = read_inputs(&gpu, &dir.join("test_data_set_0"));
    let mut past_gpu: HashMap<String, Value> =
        set0.iter().filter(|(n, _)| is_past(n)).map(|(n, t)| (n.clone(), Value::Cpu(t.clone()))).collect();
    let mut past_cpu = past_gpu.clone();
    let outputs: Vec<String> = gpu.outputs().iter().map(|o| o.name.clone()).collect();
    let mut ids = vec![5i64, 6, 7];
    let mut past_len = 0;
    for step in 0..20 {
        let rg = gpu.run(step_feeds(&gpu, &ids, past_len, &past_gpu)).unwrap();
        let rc = cpu.run(step_feeds(&cpu, &ids, past_len, &past_cpu)).unwrap();
        for name in past_gpu.keys().cloned().collect::<Vec<_>>() {
            let p = present_for(&name, &outputs);
            let g = rg.gpu(&p).unwrap_or_else(|| panic!("{p} not on the GPU"));
            let host = pollster::block_on(g.download()).unwrap();
            let want = rc.get(&p).unwrap();
            let (diff, _) = max_diff(&format!("{model} step {step} {p}"), &host, want);
            assert!(diff <= 1e-4, "{model} step {step}: {p} read back differs by {diff:.3e}");
            // the contiguous copy of a store holds the same
            let c = g.contiguous().unwrap();
            assert!(c.is_contiguous());
            let again = pollster::block_on(c.download()).unwrap();
            assert_eq!(again, host, "{model} step {step}: {p} contiguous copy");
            past_gpu.insert(name.clone(), rg.value(&p).unwrap().clone());
            past_cpu.insert(name, Value::Cpu(want.clone()));
        }
        past_len += ids.len();
        ids = vec![(step * 37 % 1000) as i64];
    }
    // the same run with the present.* read back ('cpu' for this run) gives the same values as the CPU
    let feeds = step_feeds(&gpu, &ids, past_len, &past_gpu);
    let opts = RunOptions { preferred_output_location: Some(Location::Cpu.into()) };
    let rg = gpu.run_with(feeds, None, &opts).unwrap();
    let rc = cpu.run(step_feeds(&cpu, &ids, past_len, &past_cpu)).unwrap();
    for (name, want) in rc.iter() {
        let got = rg.get(name).unwrap_or_else(|| panic!("{name} not on the host"));
        let (diff, _) = max_diff(&format!("{model} {name} (cpu location)"), got, want);
        assert!(diff <= 1e-4, "{model}: {name}: {diff:.3e}");
    }
}

/// fp32 projections run as the one-row float-weight kernels (kiln-graph's float_matmuls_as_row_kernels), so each
/// layer's q / k / v matvec also rotates q and k and appends k and v, as with 4-bit weights.
#[test]
fn tiny_llama_optimum_kv_on_gpu() {
    check("tiny-llama/onnx_optimum", true, true);
}

#[test]
fn tiny_llama_sdpa_op23_kv_on_gpu() {
    check("tiny-llama/onnx_dynamo_sdpa_op23", true, true);
}

#[test]
fn tiny_gpt2_optimum_kv_on_gpu() {
    check("tiny-gpt2/onnx_optimum", false, false);
}

#[test]
fn tiny_gpt2_sdpa_op23_kv_on_gpu() {
    check("tiny-gpt2/onnx_dynamo_sdpa_op23", false, false);
}

/// 4-bit projections (MatMulNBits): the q / k / v matvec of each layer also rotates q and k and appends k and v.
#[test]
fn tiny_llama_optimum_q4_kv_on_gpu() {
    check("tiny-llama/onnx_optimum_q4", true, true);
}

/// The fp32 export of the tiny llama and its 4-bit quantization (both optimum's) take the same dispatches a decode
/// step: the fp32 projections run as the float-weight row kernels with every fusion of the 4-bit ones, and tract's
/// transposed K before the o-projection is unfolded (no transpose copy a layer).
#[test]
fn fp32_and_q4_llama_decode_steps_take_the_same_dispatches() {
    let prompt = [15i64, 230, 7, 99, 512, 3, 871];
    let mut per_step = vec![];
    for model in ["tiny-llama/onnx_optimum", "tiny-llama/onnx_optimum_q4"] {
        let dir = tiny_fixtures().join(model);
        let path = dir.join("model.onnx");
        let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
        let prefs = kv_prefs(&probe);
        drop(probe);
        let gpu = gpu_session(&path, prefs).expect("a GPU session");
        let got = run_loop(&gpu, &dir, &prompt, 6, None);
        // the last step (past 12: no capacity growth)
        let last = got.steps.last().expect("steps");
        assert_eq!(last.kv_stores_created, 0, "{model}");
        per_step.push((model, last.dispatches));
    }
    assert_eq!(per_step[0].1, per_step[1].1, "dispatches a decode step: {per_step:?}");
}

/// float16 models: the cache stays float16 on the GPU, the KV Concat (in float16, kiln_wgsl::kv::concat_kv_in_f16)
/// appends in place and the fused attention reads the float16 past in place; the q / k / v matvec rotates and
/// appends (float16 stores) and hands the attention k and v.
#[test]
fn tiny_llama_optimum_fp16_kv_on_gpu() {
    check("tiny-llama/onnx_optimum_fp16", true, true);
}

#[test]
fn tiny_gpt2_optimum_fp16_kv_on_gpu() {
    check("tiny-gpt2/onnx_optimum_fp16", false, false);
}

#[test]
fn tiny_llama_optimum_kv_store_reads_back_exactly() {
    check_readback("tiny-llama/onnx_optimum");
}

#[test]
fn tiny_gpt2_sdpa_op23_kv_store_reads_back_exactly() {
    check_readback("tiny-gpt2/onnx_dynamo_sdpa_op23");
}

fn f32_buffer(device: &wgpu::Device, t: &Tensor, extra: usize) -> wgpu::Buffer {
    let mut bytes = t.as_bytes().unwrap().to_vec();
    bytes.resize(bytes.len().max(4) + extra, 0);
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("app buffer"),
        contents: &bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    })
}

/// A decode step whose past comes in buffers the application made on the session's device (as
/// `Tensor.fromGpuBuffer` would): the logits equal the CPU's; and the clear errors for wrong feeds.
#[test]
fn app_buffers_as_feeds() {
    let model = "tiny-llama/onnx_optimum";
    let dir = tiny_fixtures().join(model);
    let path = dir.join("model.onnx");
    let cpu = cpu_session(&path);
    let Some(gpu) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let device = gpu.gpu_device().expect("a device").clone();
    let set0 = read_inputs(&cpu, &dir.join("test_data_set_0"));
    let past0: HashMap<String, Value> =
        set0.iter().filter(|(n, _)| is_past(n)).map(|(n, t)| (n.clone(), Value::Cpu(t.clone()))).collect();
    let prompt = [11i64, 12, 13, 14, 15];
    let pre = cpu.run(step_feeds(&cpu, &prompt, 0, &past0)).unwrap();
    let outputs: Vec<String> = cpu.outputs().iter().map(|o| o.name.clone()).collect();
    let mut host_past = HashMap::new();
    let mut app_past = HashMap::new();
    for name in past0.keys() {
        let t = pre.get(&present_for(name, &outputs)).unwrap().clone();
        // a buffer larger than the tensor (allowed: the tensor is its first bytes)
        let g = gpu.gpu_tensor_from_buffer(f32_buffer(&device, &t, 64), t.element_type(), t.dims()).unwrap();
        assert_eq!(g.dims(), t.dims());
        app_past.insert(name.clone(), Value::Gpu(g));
        host_past.insert(name.clone(), Value::Cpu(t));
    }
    let want = cpu.run(step_feeds(&cpu, &[42], prompt.len(), &host_past)).unwrap();
    let before = counters(&gpu);
    let got = gpu.run(step_feeds(&gpu, &[42], prompt.len(), &app_past)).unwrap();
    let c = delta(&counters(&gpu), &before);
    eprintln!("app buffers step: {c:?}");
    assert_eq!(c.gpu_feeds, app_past.len(), "the app's buffers bound as they are");
    let (diff, _) = max_diff("logits", got.get("logits").unwrap(), want.get("logits").unwrap());
    assert!(diff <= 1e-4, "logits from app buffers differ by {diff:.3e}");
    for (name, w) in want.iter() {
        let (diff, _) = max_diff(name, got.get(name).unwrap(), w);
        assert!(diff <= 1e-4, "{name} from app buffers differs by {diff:.3e}");
    }
    // the app's buffers were only read
    let any = app_past.values().next().unwrap().as_gpu().unwrap().clone();
    let back = pollster::block_on(any.download()).unwrap();
    let name = app_past.iter().find(|(_, v)| v.as_gpu() == Some(&any)).unwrap().0;
    assert_eq!(&back, host_past[name].as_tensor().unwrap());

    let (past_name, past_t) =
        host_past.iter().next().map(|(n, v)| (n.clone(), v.as_tensor().unwrap().clone())).unwrap();
    let with = |name: &str, v: Value| {
        let mut p = app_past.clone();
        p.insert(name.to_string(), v);
        p
    };
    // a buffer too small for the dims
    let small = f32_buffer(&device, &Tensor::from_vec(&[2], vec![1f32, 2.0]).unwrap(), 0);
    let e = gpu.gpu_tensor_from_buffer(small, ElementType::F32, past_t.dims()).unwrap_err();
    assert!(e.message.contains("bytes"), "{e}");
    // an element type the GPU stores differently
    let b = f32_buffer(&device, &past_t, 0);
    let e = gpu.gpu_tensor_from_buffer(b, ElementType::I64, past_t.dims()).unwrap_err();
    assert!(e.message.contains("int64") || e.message.contains("not supported"), "{e}");
    // the wrong element type for the input
    let b = f32_buffer(&device, &past_t, 0);
    let wrong = gpu.gpu_tensor_from_buffer(b, ElementType::I32, past_t.dims()).unwrap();
    let e = gpu.run(step_feeds(&gpu, &[42], prompt.len(), &with(&past_name, wrong.into()))).unwrap_err();
    assert!(e.message.contains("element type"), "{e}");
    // a buffer without STORAGE usage
    let b = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 1024,
        usage: wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let e = gpu.gpu_tensor_from_buffer(b, ElementType::F32, &[4]).unwrap_err();
    assert!(e.message.contains("STORAGE"), "{e}");
    // a GPU tensor of another device (another session's)
    let other = gpu_session(&path, PreferredOutputLocation::default()).unwrap();
    let odev = other.gpu_device().unwrap().clone();
    let foreign = other.gpu_tensor_from_buffer(f32_buffer(&odev, &past_t, 0), ElementType::F32, past_t.dims()).unwrap();
    let e = gpu.run(step_feeds(&gpu, &[42], prompt.len(), &with(&past_name, foreign.into()))).unwrap_err();
    assert!(e.message.contains("another device"), "{e}");
    // a GPU tensor on the CPU provider
    let g = app_past.values().next().unwrap().clone();
    let e = cpu.run(step_feeds(&cpu, &[42], prompt.len(), &with(&past_name, g))).unwrap_err();
    assert!(e.message.contains("gpu-buffer"), "{e}");
    // and 'gpu-buffer' outputs on the CPU provider
    let opts = RunOptions { preferred_output_location: Some(Location::GpuBuffer.into()) };
    let e = cpu.run_with(step_feeds(&cpu, &[42], prompt.len(), &host_past), None, &opts).unwrap_err();
    assert!(e.message.contains("gpu-buffer"), "{e}");
    // the session still runs after the errors
    let again = gpu.run(step_feeds(&gpu, &[42], prompt.len(), &app_past)).unwrap();
    assert_eq!(again.get("logits"), got.get("logits"));
    let _: Option<GpuTensor> = None;
}

/// `share_gpu_device` (kiln-web's sessions: onnxruntime-web's one GPUDevice): sessions on one device, so a GPU
/// output of one feeds another (the same logits as the CPU provider's), while sessions without it each have their
/// own; and `GpuTensor::release` destroys a buffer only when no other handle holds it (a KV store appended in place
/// is shared by the past fed in and the present that comes out).
#[test]
fn shared_device_and_release() {
    let model = "tiny-llama/onnx_optimum";
    let dir = tiny_fixtures().join(model);
    let path = dir.join("model.onnx");
    let cpu = cpu_session(&path);
    let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let shared = |prefs: PreferredOutputLocation| {
        let opts = SessionOptions {
            execution_providers: vec![ExecutionProvider::WebGpu],
            preferred_output_location: prefs,
            share_gpu_device: true,
            ..Default::default()
        };
        blocking::Session::from_path(&path, &opts).unwrap()
    };
    let a = shared(kv_prefs(&probe));
    let b = shared(PreferredOutputLocation::default());
    // (wgpu's device handles of two instances may compare equal: the devices are told apart by what they accept)
    let own = gpu_session(&path, PreferredOutputLocation::default()).unwrap();

    let set0 = read_inputs(&cpu, &dir.join("test_data_set_0"));
    let past0: HashMap<String, Value> =
        set0.iter().filter(|(n, _)| is_past(n)).map(|(n, t)| (n.clone(), Value::Cpu(t.clone()))).collect();
    let outputs: Vec<String> = cpu.outputs().iter().map(|o| o.name.clone()).collect();
    let prompt = [11i64, 12, 13, 14, 15];
    let mut pre = a.run(step_feeds(&a, &prompt, 0, &past0)).unwrap();
    let cpu_pre = cpu.run(step_feeds(&cpu, &prompt, 0, &past0)).unwrap();
    let mut gpu_past = HashMap::new();
    let mut host_past = HashMap::new();
    for name in past0.keys() {
        let present = present_for(name, &outputs);
        gpu_past.insert(name.clone(), pre.take_value(&present).unwrap());
        host_past.insert(name.clone(), Value::Cpu(cpu_pre.get(&present).unwrap().clone()));
    }
    assert!(gpu_past.values().all(|v| v.as_gpu().is_some()), "present.* left on the GPU");
    let want = cpu.run(step_feeds(&cpu, &[42], prompt.len(), &host_past)).unwrap();
    // release: the step's present.* share the stores the past was appended into in place
    let mut step = a.run(step_feeds(&a, &[42], prompt.len(), &gpu_past)).unwrap();
    let (diff, _) = max_diff("logits", step.get("logits").unwrap(), want.get("logits").unwrap());
    assert!(diff <= 1e-4, "decode step logits differ by {diff:.3e}");
    // session a's GPU values feed session b
    let on_b = b.run(step_feeds(&b, &[42], prompt.len(), &gpu_past)).unwrap();
    let (diff, _) = max_diff("logits", on_b.get("logits").unwrap(), want.get("logits").unwrap());
    assert!(diff <= 1e-4, "logits on session b from session a's cache differ by {diff:.3e}");
    // a session without share_gpu_device has a device of its own: it refuses them
    let e = own.run(step_feeds(&own, &[42], prompt.len(), &gpu_past)).unwrap_err();
    assert!(e.message.contains("another device"), "{e}");

    let name = gpu_past.keys().next().unwrap().clone();
    let present = step.take_value(&present_for(&name, &outputs)).unwrap().as_gpu().unwrap().clone();
    let past = gpu_past.remove(&name).unwrap().as_gpu().unwrap().clone();
    let in_place = past.buffer() == present.buffer();
    eprintln!("{name}: the present shares the past's store: {in_place}");
    drop(gpu_past);
    drop(pre);
    assert!(in_place, "the first decode step appends into the prefill's store in place");
    assert!(!past.release(), "a store another handle holds is not destroyed");
    // the present is intact and downloads the CPU's values
    let host = pollster::block_on(present.download()).unwrap();
    let (diff, _) = max_diff(&name, &host, want.get(&present_for(&name, &outputs)).unwrap());
    assert!(diff <= 1e-4, "{name} after releasing the past differs by {diff:.3e}");
    let copy = present.clone();
    assert!(!present.release(), "a clone still holds it");
    assert!(copy.release(), "the last handle destroys the buffer");
}

/// SmolLM2-135M q4f16: 64 greedy steps with the KV cache on the GPU for every step (present.* left on the GPU and
/// fed back), against the CPU provider's greedy loop, teacher-forced on the CPU's tokens: at every step the argmax
/// equals the CPU's where the CPU's top-2 margin is above 0.25, and the mean |logit diff| is at most 0.3
/// (../shared/README.md's criterion for 4-bit models). The float16 cache stays float16 on the GPU: every decode step
/// appends the new rows in place (or, at a capacity growth, into a store twice the size) and the fused attention
/// reads the float16 past in place, so no step copies a whole cache (kiln_wgsl::kv::concat_kv_in_f16,
/// attention_reads_f16_past). Skipped when ../shared is absent.
#[test]
fn smollm2_q4f16_greedy_64_kv_on_gpu() {
    let dir = shared_models().join("smollm2-135m-instruct/onnx");
    let path = dir.join("model_q4f16.onnx");
    let set = dir.join("test_data_q4f16");
    if !path.exists() || !set.exists() {
        eprintln!("skipped: model not found ({})", path.display());
        return;
    }
    let opts = SessionOptions { intra_op_num_threads: Some(2), ..Default::default() };
    let cpu = blocking::Session::from_path(&path, &opts).expect("loading SmolLM2 on the CPU");
    let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let prefs = kv_prefs(&probe);
    drop(probe);
    let gpu = gpu_session(&path, prefs).expect("a GPU session");
    let prompt = [6403i64, 1980, 253, 655];
    const N: usize = 64;
    let reference = run_loop_from(&cpu, &set, &prompt, N - 1, None);
    let got = run_loop_from(&gpu, &set, &prompt, N - 1, Some(&reference.tokens));
    let kv_inputs = gpu.inputs().iter().filter(|i| is_past(&i.name)).count();
    let mut mismatched = vec![];
    let mut means = vec![];
    for (step, (g, c)) in got.logits.iter().zip(&reference.logits).enumerate() {
        let (a, b) = (f32_values(g), f32_values(c));
        let vocab = *c.dims().last().unwrap();
        let (a, b) = (&a[a.len() - vocab..], &b[b.len() - vocab..]);
        let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / vocab as f64;
        means.push(mean);
        let (ga, ca) = (argmax_last(g), argmax_last(c));
        let mut sorted = b.to_vec();
        sorted.sort_by(|x, y| y.partial_cmp(x).unwrap());
        let margin = sorted[0] - sorted[1];
        if ga != ca {
            mismatched.push((step, ga, ca, margin));
        }
        assert!(ga == ca || margin <= 0.25, "step {step}: argmax {ga} vs the CPU's {ca} at margin {margin:.3}");
    }
    // the mean over the steps, as the README's over the positions of a prefill
    let mean = means.iter().sum::<f64>() / means.len() as f64;
    assert!(mean <= 0.3, "mean |logit diff| over the steps {mean:.4} > 0.3");
    eprintln!("SmolLM2 q4f16: CPU greedy tokens {:?}", reference.tokens);
    eprintln!(
        "SmolLM2 q4f16: mean |logit diff| per step {means:.3?}; argmax differs (step, gpu, cpu, margin) {mismatched:?}"
    );
    // keeping the cache on the GPU changes nothing: the first steps of the same loop with every output read back
    // ('cpu' location) give the same logits
    let plain = gpu_session(&path, PreferredOutputLocation::default()).expect("a GPU session");
    let base = run_loop_from(&plain, &set, &prompt, 15, Some(&reference.tokens));
    for (step, b) in base.logits.iter().enumerate() {
        let (diff, _) = max_diff(&format!("SmolLM2 step {step}"), &got.logits[step], b);
        assert!(
            diff <= 1e-4,
            "step {step}: logits with the KV on the GPU differ from the read-back loop's: {diff:.3e}"
        );
    }
    // the cache stayed on the GPU between every two steps
    for (step, n) in got.kv_on_gpu.iter().enumerate() {
        assert_eq!(*n, kv_inputs, "step {step}: {n} of {kv_inputs} present.* on the GPU");
    }
    // one new row of one float16 cache tensor, every (batch, head): [1, 3, past, 64]
    let row_bytes = (3 * 64 * 2) as u64;
    let mut copied = 0u64;
    let mut growths = 0;
    for (step, c) in got.steps.iter().enumerate().skip(1) {
        let past_len = prompt.len() + step - 1;
        if step == 1 || step == N - 1 || c.kv_stores_created > 0 {
            eprintln!("SmolLM2 q4f16: step {step} (past {past_len}): {} dispatches, {c:?}", c.dispatches);
        }
        // every past_key_values.* is bound as the GPU value the previous step left (no upload of the cache)
        assert_eq!(c.gpu_feeds, kv_inputs, "step {step}: GPU feeds");
        // each cache appended in place, or (a capacity growth) copied once into a store twice the size; no reader
        // needed a contiguous copy of a cache
        assert_eq!(c.kv_appends_in_place + c.kv_stores_created, kv_inputs, "step {step}: {c:?}");
        assert_eq!(c.kv_compact_bytes, 0, "step {step}: a cache copied whole for a reader");
        assert_eq!(c.kv_append_bytes, kv_inputs as u64 * row_bytes, "step {step}: only the new rows written");
        if c.kv_stores_created > 0 {
            growths += 1;
            assert_eq!(c.kv_grow_bytes, kv_inputs as u64 * row_bytes * past_len as u64, "step {step}");
            assert!(past_len.is_power_of_two(), "step {step}: grew at {past_len} rows");
        } else {
            assert_eq!(c.kv_grow_bytes, 0, "step {step}");
        }
        copied += c.kv_append_bytes + c.kv_grow_bytes + c.kv_compact_bytes;
    }
    assert!(growths >= 1, "the test must cross a capacity growth");
    let added = ((N - 1) * kv_inputs) as u64 * row_bytes;
    assert!(copied <= 3 * added, "{copied} bytes copied in the caches for {added} bytes of new rows");
    eprintln!(
        "SmolLM2 q4f16: {} decode steps: {copied} bytes copied in the caches for {added} bytes of new rows",
        N - 1
    );
}

/// The CPU reference of the q / k / v + rotation node (its FusedChain: the split matmul, the head splits and
/// transposes, the rotation and the KV Concats it replaced, inlined) gives the source model's outputs: the lowered
/// graph of the 4-bit fixture, with every GPU node run by its CPU op in tract, against the model as loaded; and of
/// the float16 one, whose node also outputs v for the attention (`QkvRope::v_out`, float16 caches).
#[test]
fn qkv_rotation_node_keeps_its_cpu_reference() {
    for fixture in ["onnx_optimum_q4", "onnx_optimum_fp16"] {
        qkv_rotation_reference(fixture);
    }
}

fn qkv_rotation_reference(fixture: &str) {
    use kiln_graph::tract_onnx::prelude::*;
    use kiln_wgsl::{ops::GpuOp, Caps, Kernel};
    let dir = tiny_fixtures().join("tiny-llama").join(fixture);
    let options = kiln_graph::LoadOptions { optimization: kiln_graph::OptimizationLevel::Basic, ..Default::default() };
    let model = kiln_graph::load_path(dir.join("model.onnx"), &options).expect("loading");
    let caps = Caps { max_storage_buffers: 16, ..Caps::webgpu_defaults() };
    let lowered = kiln_graph::lower_gpu::lower(&model.typed, &caps).expect("lowering").model;
    let fused = lowered
        .nodes()
        .iter()
        .filter(|n| match n.op_as::<GpuOp>().map(|g| &g.kernel) {
            Some(Kernel::QkvRope(r)) => r.v_out == fixture.contains("fp16"),
            _ => false,
        })
        .count();
    assert_eq!(fused, 2, "{fixture}: one q/k/v + rotation node per layer");
    // the fixture's first data set, in the model's input order
    let set = dir.join("test_data_set_0");
    let inputs: TVec<TValue> = (0..model.typed.inputs.len())
        .map(|j| {
            let bytes = std::fs::read(set.join(format!("input_{j}.pb"))).expect("reading an input");
            kiln_graph::tensor_from_proto_bytes(&bytes).expect("decoding an input").1.into_tvalue()
        })
        .collect();
    let run = |m: &TypedModel| m.clone().into_runnable().expect("planning").run(inputs.clone()).expect("running");
    let (want, got) = (run(&model.typed), run(&lowered));
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!((w.shape(), w.datum_type()), (g.shape(), g.datum_type()), "{fixture}: output {i}");
        let f = |t: &TValue| {
            let t = t.cast_to::<f32>().expect("f32").into_owned();
            t.try_as_plain_ram().expect("host data").as_slice::<f32>().expect("f32 values").to_vec()
        };
        let (w16, wv) = (w.datum_type() == DatumType::F16, f(w));
        let diff = wv.iter().zip(f(g)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // float16 outputs: the rounding of values a last f32 bit apart, at most an f16 ulp of the largest
        let tol = if w16 { wv.iter().fold(0f32, |m, v| m.max(v.abs())) / 1024.0 } else { 1e-5 };
        assert!(diff <= tol, "{fixture}: output {i}: max |diff| {diff} > {tol}");
    }
}

/// A float16 Llama layer with SmolLM2's rows (hidden 576, 9 / 3 heads of 64, MLP 1536; `bench/make_llama.py --layers
/// 1 --vocab 256 --fp16`, written by the test venv's python): its q / k / v matvec rotates and appends into the
/// float16 caches and hands the attention v in both tunings of the kernels — the GPU one takes 128 lanes a column
/// for a 576-long float16 row, and a float16 store needs column pairs, so it runs 64 (`QkvRope`) — with the CPU
/// provider's greedy tokens and logits (4 f16 ulps: the matmuls and attention multiply in f16 where the adapter has
/// shader-f16) and the same dispatches a step in both tunings.
#[test]
fn a_float16_layer_with_long_rows_rotates_in_its_matvec_in_both_tunings() {
    let python = workspace_root().join(".venv/bin/python");
    if !python.exists() {
        eprintln!("\n!!!!!!!! SKIPPING the float16 layer: no .venv (scripts/test.sh makes it) !!!!!!!!\n");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-f16-layer-{}", std::process::id()));
    let set = dir.join("test_data_set_0");
    std::fs::create_dir_all(&set).expect("temp dir");
    let make = workspace_root().join("bench/make_llama.py");
    let out = std::process::Command::new(&python)
        .arg(&make)
        .arg(&dir)
        .args(["--layers", "1", "--vocab", "256", "--fp16"])
        .output()
        .expect("running make_llama.py");
    assert!(out.status.success(), "make_llama.py: {}", String::from_utf8_lossy(&out.stderr));
    // an empty past (the cache's dims and type) in the model's input order, as the fixtures' data sets hold it
    let script = format!(
        "import numpy as np, onnx\nfrom onnx import numpy_helper\n\
         m = onnx.load('{d}/model.onnx')\n\
         for j, i in enumerate(m.graph.input):\n\
         \x20   if i.name.startswith('past'):\n\
         \x20       a = np.zeros((1, 3, 0, 64), np.float16)\n\
         \x20   else:\n\
         \x20       a = np.zeros((1, 1), np.int64)\n\
         \x20   open('{s}/input_%d.pb' % j, 'wb').write(numpy_helper.from_array(a, i.name).SerializeToString())\n",
        d = dir.display(),
        s = set.display()
    );
    let out = std::process::Command::new(&python).arg("-c").arg(script).output().expect("running python");
    assert!(out.status.success(), "test data: {}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("model.onnx");
    let cpu = cpu_session(&path);
    let Some(probe) = gpu_session(&path, PreferredOutputLocation::default()) else { return };
    let prefs = kv_prefs(&probe);
    drop(probe);
    let prompt = [15i64, 230, 7, 99, 51, 3, 87];
    let steps = 6;
    let reference = run_loop(&cpu, &dir, &prompt, steps, None);
    let mut per_step = vec![];
    for tuning in [kiln_wgsl::Tuning::Cpu, kiln_wgsl::Tuning::Gpu] {
        let opts = SessionOptions {
            execution_providers: vec![ExecutionProvider::WebGpu],
            preferred_output_location: prefs.clone(),
            gpu_tuning: Some(tuning),
            ..Default::default()
        };
        let gpu = blocking::Session::from_path(&path, &opts).expect("a GPU session");
        let got = run_loop(&gpu, &dir, &prompt, steps, Some(&reference.tokens));
        for (step, (g, c)) in got.logits.iter().zip(&reference.logits).enumerate() {
            let (diff, ref_max) = max_diff(&format!("{tuning:?} step {step} logits"), g, c);
            let tol = 4.0 * f16_ulp(ref_max);
            assert!(diff <= tol, "{tuning:?}: step {step}: logits max|diff| {diff:.3e} > {tol:.3e} (max {ref_max:.3})");
            // the GPU's own greedy pick (the loop feeds the CPU's tokens) is the CPU's, but at a near-tie
            let (ga, ca) = (argmax_last(g) as usize, reference.tokens[step] as usize);
            let row = c.to_f64_vec().expect("logits");
            let last = &row[row.len() - g.dims().last().copied().unwrap_or(1)..];
            assert!(ga == ca || last[ca] - last[ga] <= tol, "{tuning:?}: step {step}: argmax {ga}, the CPU's {ca}");
        }
        // the steady steps (no capacity growth): the rotation and appends inside the q / k / v matvec
        for (i, c) in got.steps.iter().enumerate().skip(1).filter(|(_, c)| c.kv_stores_created == 0) {
            assert_eq!(c.rotations_in_matmul, 1, "{tuning:?} step {i}: rotation in the matvec");
            assert_eq!(c.kv_appends_fused, 2, "{tuning:?} step {i}: appends by the matvec");
        }
        per_step.push(got.steps.last().map(|c| c.dispatches).unwrap_or_default());
    }
    assert_eq!(per_step[0], per_step[1], "dispatches a decode step (cpu, gpu tuning)");
    let _ = std::fs::remove_dir_all(&dir);
}
