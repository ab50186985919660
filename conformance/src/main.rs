//! `kiln-conformance`: runs ONNX backend test suites and kiln's SLM fixtures through kiln.
//! The last line printed is always `N passed, M failed, K skipped`.

use std::path::PathBuf;
use std::time::Duration;

use kiln_conformance::*;

const USAGE: &str = "usage: kiln-conformance [--backend cpu|gpu] \
[--suite node|pytorch-converted|pytorch-operator|simple|light|slm|all] [--filter SUBSTR] [--data-dir DIR] \
[--jobs N] [--timeout SECS] [--cases] [--verbose]";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut backend = Backend::Cpu;
    let mut suites: Vec<Suite> = vec![Suite::Node];
    let mut filter: Option<String> = None;
    let mut data_dir: Option<PathBuf> = None;
    let mut cfg = RunConfig::default();
    let mut worker = false;
    let mut print_cases = false;
    let mut verbose = false;
    let fail = |msg: String| -> ! {
        eprintln!("kiln-conformance: {msg}\n{USAGE}");
        println!("0 passed, 0 failed, 0 skipped");
        std::process::exit(2)
    };
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| fail(format!("{name} needs a value")));
        match a.as_str() {
            "--backend" => {
                let v = value("--backend");
                backend = Backend::from_name(&v).unwrap_or_else(|| fail(format!("unknown backend `{v}`")));
            }
            "--suite" => {
                let v = value("--suite");
                suites = if v == "all" {
                    Suite::ALL.to_vec()
                } else {
                    v.split(',')
                        .map(|s| Suite::from_name(s).unwrap_or_else(|| fail(format!("unknown suite `{s}`"))))
                        .collect()
                };
            }
            "--filter" => filter = Some(value("--filter")),
            "--data-dir" => data_dir = Some(PathBuf::from(value("--data-dir"))),
            "--jobs" | "-j" => cfg.jobs = value("--jobs").parse().unwrap_or_else(|_| fail("bad --jobs".into())),
            "--timeout" => {
                cfg.timeout =
                    Duration::from_secs(value("--timeout").parse().unwrap_or_else(|_| fail("bad --timeout".into())))
            }
            "--cases" => print_cases = true,
            "--verbose" | "-v" => verbose = true,
            "--worker" => worker = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => fail(format!("unknown argument `{other}`")),
        }
    }
    cfg.backend = backend;
    if worker {
        worker_main(backend);
        return;
    }
    let needs_data = suites.iter().any(|s| *s != Suite::Slm);
    let data_dir = match data_dir {
        Some(d) => Some(d),
        None if needs_data => Some(default_data_dir().unwrap_or_else(|e| fail(e))),
        None => None,
    };
    let mut cases = vec![];
    for s in &suites {
        cases.extend(discover(*s, data_dir.as_deref(), filter.as_deref()).unwrap_or_else(|e| fail(e)));
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(format!("locating the binary: {e}")));
    let t0 = std::time::Instant::now();
    let results = run_isolated(&exe, &cases, &cfg, verbose, &|r, n, total| {
        if verbose || !r.status.is_pass() && print_cases {
            eprintln!("[{n}/{total}] {}: {}", r.case.id(), r.status.line());
        }
    });
    if print_cases {
        println!("{}", case_lines(&results));
    }
    println!("{}", backend_line(backend, &results));
    println!(
        "suites: {}; {} cases in {:.1}s",
        suites.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        results.len(),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", summary(&results));
}
