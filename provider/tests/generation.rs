//! kiln's generation helpers (`SessionOptions::generation`): the logits of the last position only and the
//! `kiln_next_token` output (the argmax on the device). Against the same model loaded without them: the last-only
//! logits equal the last row of the full logits, the next token equals the argmax of the full logits, on the CPU and
//! on the GPU (where a greedy step that fetches only the next token and leaves the cache on the GPU reads back one
//! integer). Skips, loudly, the GPU part only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use kiln_provider::{
    blocking, ElementType, ExecutionProvider, GenerationOptions, Location, PreferredOutputLocation, RunOptions,
    SessionOptions, Tensor, Value, NEXT_TOKEN,
};

fn session(path: &Path, ep: ExecutionProvider, generation: GenerationOptions) -> blocking::Session {
    let opts = SessionOptions { execution_providers: vec![ep], generation, ..Default::default() };
    blocking::Session::from_path(path, &opts).unwrap_or_else(|e| panic!("{}: loading: {e}", path.display()))
}

fn helpers() -> GenerationOptions {
    GenerationOptions { last_logits_only: true, next_token: true, ..Default::default() }
}

fn ints(et: ElementType, dims: &[usize], v: Vec<i64>) -> Value {
    let t = Tensor::from_vec(dims, v).unwrap();
    if et == ElementType::I64 {
        t.into()
    } else {
        t.cast(et).unwrap().into()
    }
}

/// The feeds of one step: `ids` after `past_len` tokens, the past from `past`.
fn feeds(s: &blocking::Session, ids: &[i64], past_len: usize, past: &HashMap<String, Value>) -> Vec<(String, Value)> {
    let n = ids.len();
    s.inputs()
        .iter()
        .map(|i| {
            let et = i.element_type.unwrap();
            let v = match i.name.as_str() {
                "input_ids" => ints(et, &[1, n], ids.to_vec()),
                "attention_mask" => ints(et, &[1, past_len + n], vec![1; past_len + n]),
                "position_ids" => ints(et, &[1, n], (past_len as i64..(past_len + n) as i64).collect()),
                name => past.get(name).unwrap_or_else(|| panic!("no feed for {name}")).clone(),
            };
            (i.name.clone(), v)
        })
        .collect()
}

fn present_of(past: &str) -> String {
    past.replacen("past_key_values", "present", 1)
}

fn argmax_rows(t: &Tensor) -> Vec<i64> {
    let v = f32_values(t);
    let vocab = *t.dims().last().unwrap();
    v.chunks(vocab).map(|r| r.iter().enumerate().fold(0, |b, (i, x)| if *x > r[b] { i } else { b }) as i64).collect()
}

/// Prefill of 5 tokens and 6 decode steps with both sessions on `ep`; the helpers' session fetches
/// `logits` and `kiln_next_token` at every step.
fn compare(model: &str, ep: ExecutionProvider) {
    let dir = tiny_fixtures().join(model);
    let path = dir.join("model.onnx");
    let plain = session(&path, ep, GenerationOptions::default());
    let gen = session(&path, ep, helpers());
    if ep == ExecutionProvider::WebGpu && gen.gpu_placement().is_none() {
        assert_no_gpu_adapter(gen.provider_note());
        eprintln!("\n!!!!!!!! SKIPPING {model} ON THE GPU: no GPU adapter ({:?}) !!!!!!!!\n", gen.provider_note());
        return;
    }
    let names: Vec<&str> = gen.outputs().iter().map(|o| o.name.as_str()).collect();
    assert!(names.contains(&NEXT_TOKEN), "{model}: outputs {names:?}");
    let next_info = gen.outputs().iter().find(|o| o.name == NEXT_TOKEN).unwrap();
    assert_eq!(next_info.element_type, Some(ElementType::I64));
    let set0 = read_inputs(&plain, &dir.join("test_data_set_0"));
    let empty: HashMap<String, Value> =
        set0.into_iter().filter(|(n, _)| n.starts_with("past")).map(|(n, t)| (n, t.into())).collect();
    let (mut past_a, mut past_b) = (empty.clone(), empty);
    let mut ids = vec![11i64, 22, 33, 44, 55];
    let mut past_len = 0;
    for step in 0..7 {
        let mut a = plain.run(feeds(&plain, &ids, past_len, &past_a)).unwrap();
        let mut b = gen.run(feeds(&gen, &ids, past_len, &past_b)).unwrap();
        let full = a.take("logits").unwrap();
        let last = b.take("logits").unwrap();
        let (batch, seq, vocab) = (full.dims()[0], full.dims()[1], full.dims()[2]);
        assert_eq!(seq, ids.len());
        assert_eq!(last.dims(), &[batch, 1, vocab], "{model} step {step}: last-only logits");
        let fv = f32_values(&full);
        let want = Tensor::from_vec(&[batch, 1, vocab], fv[(seq - 1) * vocab..seq * vocab].to_vec()).unwrap();
        let (diff, _) = max_diff(&format!("{model} step {step} last logits"), &last, &want);
        assert!(diff <= 1e-4, "{model} step {step}: last-position logits differ by {diff:.3e}");
        let next = b.take(NEXT_TOKEN).unwrap();
        assert_eq!(next.dims(), &[batch, 1]);
        let got = next.as_slice::<i64>().unwrap().to_vec();
        assert_eq!(got, argmax_rows(&want), "{model} step {step}: next token vs the argmax of the full logits");
        for name in past_a.keys().cloned().collect::<Vec<_>>() {
            past_a.insert(name.clone(), a.take_value(&present_of(&name)).unwrap());
            past_b.insert(name.clone(), b.take_value(&present_of(&name)).unwrap());
        }
        past_len += ids.len();
        ids = vec![got[0]];
    }
}

#[test]
fn tiny_fixtures_cpu() {
    for m in ["tiny-llama/onnx_optimum", "tiny-gpt2/onnx_optimum", "tiny-llama/onnx_dynamo_sdpa_op23"] {
        compare(m, ExecutionProvider::Cpu);
    }
}

#[test]
fn tiny_fixtures_gpu() {
    for m in ["tiny-llama/onnx_optimum", "tiny-gpt2/onnx_optimum", "tiny-llama/onnx_dynamo_sdpa_op23"] {
        compare(m, ExecutionProvider::WebGpu);
    }
}

/// A greedy step on the GPU that fetches the next token and keeps the cache on the GPU reads back the token only
/// (8 bytes of int64 at most), and its tokens are the CPU's.
#[test]
fn greedy_step_reads_back_one_token() {
    let dir = tiny_fixtures().join("tiny-llama/onnx_optimum");
    let path = dir.join("model.onnx");
    let cpu = session(&path, ExecutionProvider::Cpu, helpers());
    let gpu = session(&path, ExecutionProvider::WebGpu, helpers());
    if gpu.gpu_placement().is_none() {
        assert_no_gpu_adapter(gpu.provider_note());
        eprintln!("\n!!!!!!!! SKIPPING the GPU greedy step: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
        return;
    }
    let set0 = read_inputs(&cpu, &dir.join("test_data_set_0"));
    let empty: HashMap<String, Value> =
        set0.into_iter().filter(|(n, _)| n.starts_with("past")).map(|(n, t)| (n, t.into())).collect();
    let presents: Vec<String> = empty.keys().map(|n| present_of(n)).collect();
    let mut wanted: Vec<&str> = vec![NEXT_TOKEN];
    wanted.extend(presents.iter().map(|s| s.as_str()));
    let keep = RunOptions {
        preferred_output_location: Some(PreferredOutputLocation::PerOutput(
            presents.iter().map(|p| (p.clone(), Location::GpuBuffer)).collect(),
        )),
    };
    let (mut past_c, mut past_g) = (empty.clone(), empty);
    let (mut ids_c, mut ids_g) = (vec![11i64, 22, 33, 44, 55], vec![11i64, 22, 33, 44, 55]);
    let mut past_len = 0;
    for step in 0..12 {
        let mut c =
            cpu.run_with(feeds(&cpu, &ids_c, past_len, &past_c), Some(&wanted), &RunOptions::default()).unwrap();
        let before = gpu.gpu_placement().unwrap().counters;
        let mut g = gpu.run_with(feeds(&gpu, &ids_g, past_len, &past_g), Some(&wanted), &keep).unwrap();
        let after = gpu.gpu_placement().unwrap().counters;
        assert!(g.get("logits").is_none());
        let tc = c.take(NEXT_TOKEN).unwrap().as_slice::<i64>().unwrap()[0];
        let tg = g.take(NEXT_TOKEN).unwrap().as_slice::<i64>().unwrap()[0];
        assert_eq!(tg, tc, "step {step}: GPU token vs CPU token");
        let read = after.readback_bytes - before.readback_bytes;
        if step > 0 {
            assert!(read <= 8, "step {step}: {read} bytes read back (only the next token should come back)");
            assert_eq!(after.readbacks - before.readbacks, 1, "step {step}: readbacks");
        }
        for name in past_c.keys().cloned().collect::<Vec<_>>() {
            past_c.insert(name.clone(), c.take_value(&present_of(&name)).unwrap());
            let v = g.take_value(&present_of(&name)).unwrap();
            assert_eq!(v.location(), Location::GpuBuffer);
            past_g.insert(name, v);
        }
        past_len += ids_c.len();
        ids_c = vec![tc];
        ids_g = vec![tg];
    }
}

/// One greedy loop of `steps` on `s` (prompt [11, 22, 33, 44, 55]), the cache kept on the GPU where `s` has one;
/// `pipelined`: as an application keeping everything on the GPU writes it — the next token stays on the GPU
/// ('gpu-buffer') and is fed back as the next step's `input_ids`, its download started before the next step runs
/// and awaited after (a run that reads nothing back does not wait for the GPU). Returns the tokens and each step's
/// GPU counters: [readbacks, buffers created, bind groups created, KV stores created] (zeros on the CPU).
fn greedy_loop(s: &blocking::Session, dir: &Path, steps: usize, pipelined: bool) -> (Vec<i64>, Vec<[usize; 4]>) {
    let set0 = read_inputs(s, &dir.join("test_data_set_0"));
    let mut past: HashMap<String, Value> =
        set0.into_iter().filter(|(n, _)| n.starts_with("past")).map(|(n, t)| (n, t.into())).collect();
    let presents: Vec<String> = past.keys().map(|n| present_of(n)).collect();
    let mut wanted: Vec<&str> = vec![NEXT_TOKEN];
    wanted.extend(presents.iter().map(|s| s.as_str()));
    let on_gpu = s.gpu_placement().is_some();
    let mut kept: Vec<(String, Location)> = presents.iter().map(|p| (p.clone(), Location::GpuBuffer)).collect();
    if pipelined {
        kept.push((NEXT_TOKEN.into(), Location::GpuBuffer));
    }
    let options = RunOptions {
        preferred_output_location: on_gpu.then_some(PreferredOutputLocation::PerOutput(kept.into_iter().collect())),
    };
    let token = |t: &Tensor| t.cast(ElementType::I64).unwrap().as_slice::<i64>().unwrap()[0];
    let counters = || s.gpu_placement().map(|r| r.counters).unwrap_or_default();
    let (mut ids, mut past_len, mut tokens, mut per_step) = (vec![11i64, 22, 33, 44, 55], 0, vec![], vec![]);
    let mut token_on_gpu: Option<kiln_provider::GpuTensor> = None;
    for step in 0..steps {
        let mut f = feeds(s, &ids, past_len, &past);
        if let Some(t) = &token_on_gpu {
            f.iter_mut().find(|(n, _)| n == "input_ids").expect("input_ids").1 = t.clone().into();
        }
        let previous = token_on_gpu.take().map(|t| t.download());
        let before = counters();
        let mut out = s.run_with(f, Some(&wanted), &options).unwrap_or_else(|e| panic!("step {step}: {e}"));
        let after = counters();
        per_step.push([
            after.readbacks - before.readbacks,
            after.buffers_created - before.buffers_created,
            after.bind_groups_created - before.bind_groups_created,
            after.kv_stores_created - before.kv_stores_created,
        ]);
        for name in past.keys().cloned().collect::<Vec<_>>() {
            past.insert(name.clone(), out.take_value(&present_of(&name)).unwrap());
        }
        past_len += ids.len();
        if pipelined {
            match out.take_value(NEXT_TOKEN) {
                Some(Value::Gpu(t)) => token_on_gpu = Some(t),
                other => panic!("step {step}: the next token is not on the GPU: {other:?}"),
            }
            if let Some(p) = previous {
                tokens.push(token(&pollster::block_on(p).unwrap()));
            }
            ids = vec![0];
        } else {
            tokens.push(token(&out.take(NEXT_TOKEN).unwrap()));
            ids = vec![*tokens.last().unwrap()];
        }
    }
    if let Some(t) = token_on_gpu {
        tokens.push(token(&pollster::block_on(t.download()).unwrap()));
    }
    (tokens, per_step)
}

/// The pipelined loop ([`greedy_loop`]) on the GPU generates the CPU's tokens for three export styles (the q4
/// one through the rotation-in-matvec kernels), reads nothing back inside its runs, and keeps the buffer pool
/// steady: on a decode step with no KV capacity growth (nor one two steps before), the token handed to the
/// application costs no new buffer (the pool takes back the one the application let go of: kiln_wgsl's
/// `BufferPool::handed`) and at most the bind groups of the two dispatches that touch it (the argmax writing it,
/// the embedding gather reading it) more than the stepwise loop's same step — not a reshuffle of the pool's
/// buffers among the other dispatches (their cached bind groups would miss).
#[test]
fn a_pipelined_greedy_loop_keeps_the_token_on_the_gpu() {
    for model in ["tiny-llama/onnx_optimum", "tiny-llama/onnx_optimum_q4", "tiny-gpt2/onnx_optimum"] {
        let dir = tiny_fixtures().join(model);
        let path = dir.join("model.onnx");
        let gpu = session(&path, ExecutionProvider::WebGpu, helpers());
        if gpu.gpu_placement().is_none() {
            assert_no_gpu_adapter(gpu.provider_note());
            eprintln!("\n!!!!!!!! SKIPPING the pipelined loop: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
            return;
        }
        let steps = 16;
        let cpu = session(&path, ExecutionProvider::Cpu, helpers());
        let (want, _) = greedy_loop(&cpu, &dir, steps, false);
        let (stepwise, reference) = greedy_loop(&gpu, &dir, steps, false);
        let (got, counters) = greedy_loop(&gpu, &dir, steps, true);
        assert_eq!(stepwise, want, "{model}: GPU tokens (read back each step) vs CPU");
        assert_eq!(got, want, "{model}: pipelined GPU tokens vs CPU");
        let mut steady = 0;
        for step in 3..steps {
            let (r, p) = (reference[step], counters[step]);
            assert_eq!(r[0], 1, "{model} step {step}: the stepwise loop reads the token back");
            assert_eq!(p[0], 0, "{model} step {step}: the pipelined loop's runs read nothing back");
            // a KV capacity growth rebinds the new stores for a step or two (more in one loop than the other
            // depending on which buffers the allocator hands back)
            if (step - 2..=step).any(|s| p_or_r_grew(&counters, &reference, s)) {
                continue;
            }
            steady += 1;
            assert!(p[1] <= r[1], "{model} step {step}: buffers created {} (stepwise {})", p[1], r[1]);
            assert!(p[2] <= r[2] + 2, "{model} step {step}: bind groups created {} (stepwise {})", p[2], r[2]);
        }
        assert!(steady >= 5, "{model}: {steady} steady steps");
    }
}

/// Whether either loop made KV stores (a capacity growth) at `step`.
fn p_or_r_grew(a: &[[usize; 4]], b: &[[usize; 4]], step: usize) -> bool {
    a[step][3] + b[step][3] > 0
}

#[test]
fn bad_generation_options_are_clear_errors() {
    let path = tiny_fixtures().join("tiny-llama/onnx_optimum/model.onnx");
    let opts = |generation| SessionOptions { generation, ..Default::default() };
    let named = GenerationOptions { logits: Some("nope".into()), next_token: true, ..Default::default() };
    let e = blocking::Session::from_path(&path, &opts(named)).err().expect("an unknown logits output is refused");
    assert!(e.to_string().contains("no output `nope`"), "{e}");
    // an output not made by a MatMul head (present.0.key: a Concat)
    let present =
        GenerationOptions { logits: Some("present.0.key".into()), last_logits_only: true, ..Default::default() };
    let e = blocking::Session::from_path(&path, &opts(present)).err().expect("a non-head output is refused");
    assert!(e.to_string().contains("not a MatMul head") || e.to_string().contains("does not come from"), "{e}");
}

/// The next token left on the GPU comes back to the session's buffer pool once the application drops it (a run in
/// a steady loop makes no buffer) — but not when the application took its `wgpu::Buffer` (it may hold a clone:
/// later runs never write into it) or released the tensor (destroyed at once, as onnxruntime-web's `dispose`).
#[test]
fn an_output_buffer_the_application_took_or_released_is_never_reused() {
    let dir = tiny_fixtures().join("tiny-llama/onnx_optimum");
    let gpu = session(&dir.join("model.onnx"), ExecutionProvider::WebGpu, helpers());
    if gpu.gpu_placement().is_none() {
        assert_no_gpu_adapter(gpu.provider_note());
        eprintln!("\n!!!!!!!! SKIPPING the pooled outputs: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
        return;
    }
    let set0 = read_inputs(&gpu, &dir.join("test_data_set_0"));
    let past: HashMap<String, Value> =
        set0.into_iter().filter(|(n, _)| n.starts_with("past")).map(|(n, t)| (n, t.into())).collect();
    let options = RunOptions {
        preferred_output_location: Some(PreferredOutputLocation::PerOutput(
            [(NEXT_TOKEN.to_string(), Location::GpuBuffer)].into_iter().collect(),
        )),
    };
    // the same prefill every run: a steady loop's allocations
    let run = || -> (kiln_provider::GpuTensor, usize) {
        let before = gpu.gpu_placement().expect("report").counters.buffers_created;
        let mut out = gpu.run_with(feeds(&gpu, &[11, 22, 33], 0, &past), Some(&[NEXT_TOKEN]), &options).unwrap();
        let made = gpu.gpu_placement().expect("report").counters.buffers_created - before;
        match out.take_value(NEXT_TOKEN) {
            Some(Value::Gpu(t)) => (t, made),
            other => panic!("the next token is not on the GPU: {other:?}"),
        }
    };
    let token = |t: &kiln_provider::GpuTensor| {
        let host = pollster::block_on(t.download()).unwrap();
        host.cast(kiln_provider::ElementType::I64).unwrap().as_slice::<i64>().unwrap()[0]
    };
    let (first, _) = run();
    let want = token(&first);
    drop(first);
    for _ in 0..3 {
        let (t, _) = run();
        assert_eq!(token(&t), want);
    }
    // dropped: taken back, no buffer made
    let (t, made) = run();
    assert_eq!(made, 0, "a steady run whose last token was dropped made {made} buffers");
    // exposed: never taken back
    let exposed = t.buffer().clone();
    drop(t);
    for i in 0..3 {
        let (t, made) = run();
        assert!(i > 0 || made == 1, "after an exposed token the next run makes one buffer, made {made}");
        assert!(t.buffer() != &exposed, "run {i}: the token landed in a buffer the application holds");
        assert_eq!(token(&t), want);
    }
    // released: destroyed now (the pool's handle does not keep it), and the next run makes its own
    let (t, _) = run();
    assert!(t.release(), "releasing the only application handle destroys the buffer");
    let (t, made) = run();
    assert_eq!(made, 1, "after a released token the next run makes one buffer, made {made}");
    assert_eq!(token(&t), want);
}
