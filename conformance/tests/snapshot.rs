//! Per-case conformance status as insta snapshots, one per suite: any change in the pass set (or in a failure's
//! reason) fails this test and shows in review. Accept an intended change with
//! `INSTA_UPDATE=always cargo test --release -p kiln-conformance` (or `cargo insta review`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_conformance::*;

fn data_dir() -> PathBuf {
    match default_data_dir() {
        Ok(d) => d,
        Err(e) => panic!("kiln-conformance snapshot: {e}"),
    }
}

fn snapshot(suite: Suite, backend: Backend) -> String {
    let data = if suite == Suite::Slm { None } else { Some(data_dir()) };
    let cases = discover(suite, data.as_deref(), None).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cases.is_empty(), "suite {} has no cases; {INSTALL_HINT}", suite.name());
    let cfg = RunConfig { backend, timeout: Duration::from_secs(300), jobs: default_jobs() };
    let exe = Path::new(env!("CARGO_BIN_EXE_kiln-conformance"));
    let results = run_isolated(exe, &cases, &cfg, false, &|_, _, _| {});
    assert_eq!(results.len(), cases.len());
    format!("{}\n\n{}\n", case_lines(&results), summary(&results))
}

macro_rules! suite_test {
    ($name:ident, $suite:expr, $backend:expr) => {
        #[test]
        fn $name() {
            let s = snapshot($suite, $backend);
            insta::assert_snapshot!(stringify!($name), s);
        }
    };
}

suite_test!(node, Suite::Node, Backend::Cpu);
suite_test!(pytorch_converted, Suite::PytorchConverted, Backend::Cpu);
suite_test!(pytorch_operator, Suite::PytorchOperator, Backend::Cpu);
suite_test!(simple, Suite::Simple, Backend::Cpu);
suite_test!(light, Suite::Light, Backend::Cpu);
suite_test!(slm, Suite::Slm, Backend::Cpu);

// The same suites on the webgpu provider (lavapipe in CI): each case's status and its GPU placement
// (`[gpu nodes placed/total]`), with the count of cases fully on the GPU in the summary. Without a GPU adapter the
// provider falls back to the CPU and these snapshots fail (the placement tags vanish): CI installs lavapipe.
suite_test!(node_gpu, Suite::Node, Backend::Gpu);
suite_test!(pytorch_converted_gpu, Suite::PytorchConverted, Backend::Gpu);
suite_test!(pytorch_operator_gpu, Suite::PytorchOperator, Backend::Gpu);
suite_test!(simple_gpu, Suite::Simple, Backend::Gpu);
suite_test!(light_gpu, Suite::Light, Backend::Gpu);
suite_test!(slm_gpu, Suite::Slm, Backend::Gpu);
