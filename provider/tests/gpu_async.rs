//! The GPU run path is async end to end: `Session::run`'s future is `Send` (it can move to any executor's thread),
//! and runs on one session from several threads at once queue on the backend's async lock (no thread blocks on
//! another's lock; each waits on a future) and all return the reference outputs. Skips, loudly, only without a GPU
//! adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use std::sync::Arc;

use common::*;
use graphs::*;
use kiln_provider::{ExecutionProvider, Session, Tensor};

type Feeds = Vec<(String, Tensor)>;

fn assert_send<T: Send>(_: &T) {}

#[test]
fn concurrent_runs_queue_and_match_the_reference() {
    if !gpu_available() {
        return;
    }
    let dir = tiny_fixtures().join("tiny-gpt2/onnx_optimum");
    let session = Arc::new(
        pollster::block_on(Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::WebGpu)))
            .expect("loading"),
    );
    assert_eq!(session.execution_provider(), ExecutionProvider::WebGpu);
    let blocking = kiln_provider::blocking::Session(
        pollster::block_on(Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::Cpu)))
            .expect("loading"),
    );
    let sets: Vec<(Feeds, Feeds)> = ["test_data_set_0", "test_data_set_1"]
        .iter()
        .map(|s| (read_inputs(&blocking, &dir.join(s)), read_outputs(&blocking, &dir.join(s))))
        .collect();
    let sets = Arc::new(sets);
    {
        let fut = session.run(sets[0].0.clone());
        assert_send(&fut);
        drop(fut);
    }
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (session, sets) = (session.clone(), sets.clone());
            std::thread::spawn(move || {
                for i in 0..10 {
                    let (feeds, expected) = &sets[(t + i) % 2];
                    let out = pollster::block_on(session.run(feeds.clone()))
                        .unwrap_or_else(|e| panic!("thread {t} run {i}: {e}"));
                    for (name, want) in expected {
                        let (diff, _) = max_diff(name, out.output(name).unwrap(), want);
                        assert!(diff <= 1e-4, "thread {t} run {i}: {name}: max|diff| {diff:.3e}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a run thread panicked");
    }
    let report = session.gpu_placement().expect("a GPU session");
    assert_eq!(report.runs, 40);
    assert!(report.counters.submits <= report.runs, "{:?}", report.counters);
}
