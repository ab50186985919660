//! `kiln-run`: prints a model's inputs and outputs, and runs greedy decoding with a KV cache.
//!
//! ```text
//! kiln-run MODEL.onnx                                   # input/output metadata
//! kiln-run MODEL.onnx --ids 6403,1980,253,655 --greedy 20
//! kiln-run MODEL.onnx --placement --provider gpu
//! ```

mod decode;
mod text;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kiln_provider::blocking::Session;
use kiln_provider::{Device, ExecutionProvider, GenerationOptions, SessionOptions, ValueInfo};

const USAGE: &str = "\
usage: kiln-run MODEL.onnx [options]

Without options, prints the model's inputs and outputs (name, element type, shape with symbolic names).

options:
  --ids 1,2,3          prompt token ids (comma separated)
  --prompt TEXT        prompt text, tokenized with tokenizer.json beside the model (instead of --ids)
  --greedy N           generate N tokens greedily (prefill, then one token at a time with the KV cache)
  --provider cpu|gpu   execution provider (gpu: WebGPU, falls back to cpu where unavailable)
  --threads N          CPU threads for the kernels (default 1)
  --placement          print where the model runs (provider, node count)
  --host-kv            on the GPU, read the KV cache back and upload it every step (default: it stays on the GPU)
  --no-pipeline        on the GPU, read each token back before recording the next step (default: the token stays
                       on the GPU as the next input and is read back while the GPU runs the next step)
  --no-text            do not decode the generated tokens to text
  --full-logits        greedy: compute every position's logits and read them back (default: kiln's generation
                       helpers, the last position's logits only and the argmax on the device)
  -h, --help           this help";

#[derive(Debug, Default)]
struct Args {
    model: Option<PathBuf>,
    ids: Option<Vec<i64>>,
    prompt: Option<String>,
    greedy: Option<usize>,
    provider: Option<ExecutionProvider>,
    threads: Option<usize>,
    placement: bool,
    host_kv: bool,
    no_pipeline: bool,
    no_text: bool,
    full_logits: bool,
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let mut args = Args::default();
    let mut it = argv.iter();
    fn value<'a>(it: &mut std::slice::Iter<'a, String>, flag: &str) -> Result<&'a String, String> {
        it.next().ok_or_else(|| format!("{flag} needs a value"))
    }
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--ids" => {
                let v = value(&mut it, a)?;
                let ids = v
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse::<i64>().map_err(|e| format!("--ids: `{s}` is not a token id ({e})")))
                    .collect::<Result<Vec<_>, _>>()?;
                if ids.is_empty() {
                    return Err("--ids: no token ids given".into());
                }
                args.ids = Some(ids);
            }
            "--prompt" => args.prompt = Some(value(&mut it, a)?.clone()),
            "--greedy" => {
                let v = value(&mut it, a)?;
                let n = v.parse::<usize>().map_err(|e| format!("--greedy: `{v}` is not a count ({e})"))?;
                if n == 0 {
                    return Err("--greedy: the count must be at least 1".into());
                }
                args.greedy = Some(n);
            }
            "--provider" => {
                let v = value(&mut it, a)?;
                args.provider = Some(ExecutionProvider::from_name(v).map_err(|e| format!("--provider: {e}"))?);
            }
            "--threads" => {
                let v = value(&mut it, a)?;
                let n = v.parse::<usize>().map_err(|e| format!("--threads: `{v}` is not a count ({e})"))?;
                if n == 0 {
                    return Err("--threads: the count must be at least 1".into());
                }
                args.threads = Some(n);
            }
            "--placement" => args.placement = true,
            "--host-kv" => args.host_kv = true,
            "--no-pipeline" => args.no_pipeline = true,
            "--no-text" => args.no_text = true,
            "--full-logits" => args.full_logits = true,
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`")),
            s => {
                if args.model.is_some() {
                    return Err(format!("unexpected argument `{s}` (the model is already given)"));
                }
                args.model = Some(PathBuf::from(s));
            }
        }
    }
    if args.model.is_none() {
        return Err("no model given".into());
    }
    if args.ids.is_some() && args.prompt.is_some() {
        return Err("give either --ids or --prompt, not both".into());
    }
    if (args.ids.is_some() || args.prompt.is_some()) && args.greedy.is_none() {
        args.greedy = Some(1);
    }
    if args.greedy.is_some() && args.ids.is_none() && args.prompt.is_none() {
        return Err("--greedy needs a prompt: --ids 1,2,3 or --prompt TEXT".into());
    }
    Ok(Some(args))
}

fn print_values(title: &str, values: &[ValueInfo]) {
    println!("{title}:");
    let width = values.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for v in values {
        let ty = match v.element_type {
            Some(t) => t.name().to_string(),
            None => format!("unsupported ({})", kiln_provider::ErrorKind::NotImplemented.as_str()),
        };
        println!("  {:width$}  {:8}  {}", v.name, ty, v.shape_string(), width = width);
    }
}

/// The provider, node counts and, on the GPU, which nodes stay on the CPU and why.
fn print_placement(session: &Session, threads: Option<usize>) {
    let m = session.model();
    println!("placement:");
    println!("  provider: {}", session.execution_provider().name());
    match session.gpu_placement() {
        Some(r) => {
            println!("  adapter: {}", r.adapter);
            println!(
                "  kernels: {:?} tuning, shader-f16 {}, {} kernels multiplying in f16",
                r.tuning, r.shader_f16, r.f16_kernels
            );
            println!(
                "  nodes: {} of {} on webgpu, {} on cpu; transfers: {} to device, {} to host",
                r.gpu_nodes(),
                r.nodes.len(),
                r.nodes.len() - r.gpu_nodes(),
                r.to_device,
                r.to_host
            );
            let mut on_cpu: std::collections::BTreeMap<(String, String), usize> = Default::default();
            for n in r.nodes.iter().filter(|n| n.device == Device::Cpu) {
                *on_cpu.entry((n.op.clone(), n.reason.clone().unwrap_or_default())).or_default() += 1;
            }
            for ((op, reason), count) in on_cpu {
                println!(
                    "    cpu: {count} × {op}{}",
                    if reason.is_empty() { String::new() } else { format!(" ({reason})") }
                );
            }
        }
        None => println!("  nodes: {} (all on {})", m.typed.nodes.len(), session.execution_provider().name()),
    }
    println!("  threads: {}", threads.unwrap_or(1));
    println!("  opset: {}{}", m.opset, m.domains.iter().map(|(d, v)| format!(", {d} {v}")).collect::<String>());
    for line in &m.pass_log {
        println!("  pass: {line}");
    }
}

fn run(args: Args) -> Result<(), String> {
    let model = args.model.clone().unwrap_or_default();
    if !model.is_file() {
        return Err(format!("model file {} does not exist", model.display()));
    }
    // the prompt first: a missing tokenizer should not wait for the model to load
    let tokenizer = if args.greedy.is_none() || (args.no_text && args.prompt.is_none()) {
        None
    } else {
        text::find_tokenizer(&model)
    };
    let prompt_ids = match (&args.ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => match &tokenizer {
            Some(tok) => tok.encode(p)?,
            None => return Err(text::unavailable_reason(&model)),
        },
        (None, None) => vec![],
    };
    let mut options = SessionOptions { intra_op_num_threads: args.threads, ..Default::default() };
    if let Some(ep) = args.provider {
        options.execution_providers = vec![ep];
    }
    let t0 = Instant::now();
    let mut session = None;
    if args.greedy.is_some() && !args.full_logits {
        let generation = GenerationOptions { last_logits_only: true, next_token: true, ..Default::default() };
        let opts = SessionOptions { generation, ..options.clone() };
        match Session::from_path(&model, &opts) {
            Ok(s) => session = Some(s),
            Err(e) => println!("note: without the generation helpers ({e})"),
        }
    }
    let session = match session {
        Some(s) => s,
        None => Session::from_path(&model, &options).map_err(|e| format!("loading {}: {e}", model.display()))?,
    };
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Some(note) = session.provider_note() {
        println!("note: {note}");
    }
    println!("model: {} (loaded in {load_ms:.0} ms)", model.display());
    print_values("inputs", session.inputs());
    print_values("outputs", session.outputs());

    if args.placement {
        print_placement(&session, args.threads);
    }

    let Some(steps) = args.greedy else { return Ok(()) };
    let mut plan = decode::DecodePlan::new(&session, &model)?;
    plan.gpu_kv = !args.host_kv;
    plan.pipeline = !args.no_pipeline;
    let result = plan.greedy(&session, &prompt_ids, steps)?;
    println!("prompt: {prompt_ids:?}");
    println!("tokens: {:?}", result.tokens);
    println!("prefill: {:.2} ms ({} tokens)", result.prefill_ms, prompt_ids.len());
    match result.decode_ms.len() {
        0 => println!("decode: - (one token only)"),
        n => {
            // the median too: the first decode step compiles its kernels (one-row matmuls, decode attention)
            let mut sorted = result.decode_ms.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "decode: {:.2} ms/token (mean of {n}; median {:.2}, min {:.2}, max {:.2})",
                result.decode_ms.iter().sum::<f64>() / n as f64,
                sorted[n / 2],
                sorted[0],
                sorted[n - 1]
            )
        }
    }
    if args.placement {
        if let Some(r) = session.gpu_placement() {
            let runs = r.runs.max(1);
            println!(
                "gpu work over {} runs: {:.1} submits, {:.1} dispatches, {:.1} uploads, {:.1} readbacks ({:.0} bytes) per run",
                r.runs,
                r.counters.submits as f64 / runs as f64,
                r.counters.dispatches as f64 / runs as f64,
                r.counters.uploads as f64 / runs as f64,
                r.counters.readbacks as f64 / runs as f64,
                r.counters.readback_bytes as f64 / runs as f64
            );
            #[cfg(not(target_arch = "wasm32"))]
            println!(
                "gpu host time per run: {:.2} ms encoding + submitting, {:.2} ms waiting for the GPU, {:.2} ms the rest \
                 (recording, CPU nodes)",
                r.counters.submit_us as f64 / 1e3 / runs as f64,
                r.counters.wait_us as f64 / 1e3 / runs as f64,
                r.counters.run_us.saturating_sub(r.counters.submit_us + r.counters.wait_us) as f64 / 1e3 / runs as f64
            );
            if let (Some(p), n) = (&result.warm, r.runs.saturating_sub(result.warm.as_ref().map_or(0, |p| p.runs))) {
                if n > 0 {
                    let d = |a: usize, b: usize| a.saturating_sub(b) as f64 / n as f64;
                    println!(
                        "gpu work per decode step (mean of the last {n}): {:.1} submits (+{:.1} early), {:.1} dispatches, {:.1} \
                         uploads, {:.1} readbacks, {:.1} bind groups created",
                        d(r.counters.submits, p.counters.submits),
                        d(r.counters.early_submits, p.counters.early_submits),
                        d(r.counters.dispatches, p.counters.dispatches),
                        d(r.counters.uploads, p.counters.uploads),
                        d(r.counters.readbacks, p.counters.readbacks),
                        d(r.counters.bind_groups_created, p.counters.bind_groups_created)
                    );
                    #[cfg(not(target_arch = "wasm32"))]
                    {
                        let us = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e3 / n as f64;
                        let (c, q) = (&r.counters, &p.counters);
                        let (sub, wait, run) =
                            (us(c.submit_us, q.submit_us), us(c.wait_us, q.wait_us), us(c.run_us, q.run_us));
                        println!(
                            "gpu host time per decode step: {:.2} ms recording and CPU nodes, {sub:.2} ms encoding + \
                             submitting, {wait:.2} ms waiting for the GPU",
                            run - sub - wait
                        );
                    }
                    let mut prof: Vec<(String, u64, u64)> = r
                        .profile
                        .iter()
                        .map(|(k, c, ns)| {
                            let (c0, ns0) = p.profile.iter().find(|q| &q.0 == k).map(|q| (q.1, q.2)).unwrap_or((0, 0));
                            (k.clone(), c.saturating_sub(c0), ns.saturating_sub(ns0))
                        })
                        .collect();
                    prof.sort_by_key(|p| std::cmp::Reverse(p.1));
                    for (k, c, ns) in prof.iter().filter(|p| p.1 > 0) {
                        println!(
                            "gpu decode profile: {k:<24} {:>8.1} dispatches/step {:>9.3} ms/step",
                            *c as f64 / n as f64,
                            *ns as f64 / 1e6 / n as f64
                        );
                    }
                }
            }
            let mut prof = r.profile.clone();
            prof.sort_by_key(|p| std::cmp::Reverse(p.2));
            let total: u64 = prof.iter().map(|p| p.2).sum();
            for (k, n, ns) in prof.iter().take(16) {
                println!(
                    "gpu profile: {k:<24} {:>8.1} dispatches/run {:>9.3} ms/run ({:>4.1}%)",
                    *n as f64 / runs as f64,
                    *ns as f64 / 1e6 / runs as f64,
                    100.0 * *ns as f64 / total.max(1) as f64
                );
            }
        }
    }
    if !args.no_text {
        if let Some(tok) = &tokenizer {
            match tok.decode(&result.tokens) {
                Ok(t) => println!("text: {t:?}"),
                Err(e) => println!("text: (not decoded: {e})"),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    // kiln turns panics inside the engine into errors; keep the default hook from printing them as crashes.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(|| run(args));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("error: internal error in kiln-run ({msg}); please report it");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Result<Option<Args>, String> {
        parse_args(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_greedy() {
        let a = args(&["m.onnx", "--ids", "1, 2,3", "--greedy", "4", "--threads", "2"]).unwrap().unwrap();
        assert_eq!(a.ids, Some(vec![1, 2, 3]));
        assert_eq!(a.greedy, Some(4));
        assert_eq!(a.threads, Some(2));
    }

    #[test]
    fn rejects_bad_args() {
        assert!(args(&[]).is_err());
        assert!(args(&["m.onnx", "--ids", "x"]).is_err());
        assert!(args(&["m.onnx", "--greedy", "3"]).is_err());
        assert!(args(&["m.onnx", "--provider", "tpu"]).is_err());
        assert!(args(&["m.onnx", "--frobnicate"]).is_err());
        assert!(args(&["m.onnx", "--threads", "0"]).is_err());
        assert!(args(&["--help"]).unwrap().is_none());
    }
}
