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

fn snapshot(suite: Suite) -> String {
    let data = if suite == Suite::Slm { None } else { Some(data_dir()) };
    let cases = discover(suite, data.as_deref(), None).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cases.is_empty(), "suite {} has no cases; {INSTALL_HINT}", suite.name());
    let cfg = RunConfig { backend: Backend::Cpu, timeout: Duration::from_secs(300), jobs: default_jobs() };
    let exe = Path::new(env!("CARGO_BIN_EXE_kiln-conformance"));
    let results = run_isolated(exe, &cases, &cfg, false, &|_, _, _| {});
    assert_eq!(results.len(), cases.len());
    format!("{}\n\n{}\n", case_lines(&results), summary(&results))
}

macro_rules! suite_test {
    ($name:ident, $suite:expr) => {
        #[test]
        fn $name() {
            let s = snapshot($suite);
            insta::assert_snapshot!(stringify!($name), s);
        }
    };
}

suite_test!(node, Suite::Node);
suite_test!(pytorch_converted, Suite::PytorchConverted);
suite_test!(pytorch_operator, Suite::PytorchOperator);
suite_test!(simple, Suite::Simple);
suite_test!(light, Suite::Light);
suite_test!(slm, Suite::Slm);
