//! A tiny test runner shared by the driver e2e tests (harness = false: the
//! container driver re-execs the test binary as its `forkstart` helper).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub type TestResult = Result<(), String>;
pub type TestFn = fn(PathBuf) -> Pin<Box<dyn Future<Output = TestResult>>>;

/// Run `tests` (each in its own temp dir, 120 s limit), print the outcome
/// of each and `N passed, N failed`, exit 1 on any failure. A failed test's
/// dir is kept for its logs.
pub fn run(tests: &[(&str, TestFn)], filter: Option<&str>, prefix: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if filter.is_some_and(|flt| !name.contains(flt)) {
            continue;
        }
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        println!("test {name} ...");
        let r = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(120), f(dir.path().to_path_buf()))
                .await
                .unwrap_or_else(|_| Err("timed out after 120s".into()))
        });
        match r {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(msg) => {
                println!("test {name} ... FAILED: {msg}");
                println!("  logs kept in {}", dir.keep().display());
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
