//! GPU memory does not grow: one session of tiny-gpt2 (onnx_optimum) runs 1,000 times on the WebGPU provider,
//! prefill and decode alternating (two sets of shapes), and after the first runs the GPU buffers the session has
//! created (pooled tensor buffers, the uniform / upload / staging arenas) stay exactly the same; the last run still
//! matches the reference. Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::*;
use kiln_provider::{blocking, ExecutionProvider, SessionOptions};

#[test]
fn thousand_runs_do_not_grow_gpu_memory() {
    runs_do_not_grow_gpu_memory(1000, Some(0));
}

/// The same with a run's work submitted every 5 dispatches while the rest is recorded (`gpu_submit_every`, on by
/// default on GPUs, off on lavapipe): same results, same memory, cached bind groups still hit.
#[test]
fn early_submits_keep_results_and_memory() {
    runs_do_not_grow_gpu_memory(200, Some(5));
}

fn runs_do_not_grow_gpu_memory(runs: usize, submit_every: Option<usize>) {
    let model = "tiny-gpt2/onnx_optimum";
    let dir = tiny_fixtures().join(model);
    let opts = SessionOptions {
        execution_providers: vec![ExecutionProvider::WebGpu],
        gpu_submit_every: submit_every,
        ..Default::default()
    };
    let session = blocking::Session::from_path(dir.join("model.onnx"), &opts).expect("loading");
    if session.gpu_placement().is_none() {
        assert_no_gpu_adapter(session.provider_note());
        eprintln!(
            "\n!!!!!!!! SKIPPING GPU MEMORY TEST: no GPU adapter ({:?}). \
             Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n",
            session.provider_note()
        );
        return;
    }
    let sets: Vec<_> = ["test_data_set_0", "test_data_set_1"]
        .iter()
        .map(|s| {
            let d = dir.join(s);
            (read_inputs(&session, &d), read_outputs(&session, &d))
        })
        .collect();
    let memory = || {
        let c = session.gpu_placement().unwrap_or_default().counters;
        (c.buffers_created, c.buffer_bytes, c.arena_bytes)
    };
    let mut warm = None;
    let start = std::time::Instant::now();
    for run in 0..runs {
        let (feeds, expected) = &sets[run % 2];
        let out = session.run(feeds.clone()).unwrap_or_else(|e| panic!("run {run}: {e}"));
        if run == 3 {
            warm = Some(memory());
        }
        if run + 2 >= runs {
            for (name, want) in expected {
                let got = out.get(name).unwrap_or_else(|| panic!("no output `{name}`"));
                let (diff, _) = max_diff(name, got, want);
                assert!(diff <= 1e-4, "run {run}: {name}: max|diff| {diff:.3e}");
            }
        }
    }
    let report = session.gpu_placement().unwrap_or_default();
    eprintln!(
        "{model}: {} runs in {:.1?}; after run 4 {:?}, after run {runs} {:?}; {:?}",
        report.runs,
        start.elapsed(),
        warm,
        memory(),
        report.counters
    );
    assert_eq!(
        warm,
        Some(memory()),
        "GPU buffers grew between run 4 and run {runs} (created, pool bytes, arena bytes)"
    );
    assert!(report.counters.submits <= report.runs, "more than one waited-for submit per run: {:?}", report.counters);
    match submit_every {
        Some(0) => assert_eq!(report.counters.early_submits, 0, "{:?}", report.counters),
        _ => {
            assert!(report.counters.early_submits >= report.runs, "no early submit in some runs: {:?}", report.counters)
        }
    }
    // a steady decode loop (same shapes run after run) creates no bind group once warm
    let (feeds, _) = &sets[1];
    let bind_groups = || session.gpu_placement().unwrap_or_default().counters.bind_groups_created;
    let mut warm_groups = 0;
    for run in 0..40 {
        session.run(feeds.clone()).unwrap_or_else(|e| panic!("decode run {run}: {e}"));
        if run == 19 {
            warm_groups = bind_groups();
        }
    }
    eprintln!("bind groups created: {warm_groups} after 20 decode runs, {} after 40", bind_groups());
    assert_eq!(warm_groups, bind_groups(), "a steady decode loop still creates bind groups");
}
