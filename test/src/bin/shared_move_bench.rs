//! `shared-move-bench`: live VM moves on a shared pool (nothing copied
//! first), with and without the source waiting for the target's QEMU to
//! listen (plan feature `target_listens`), side by side in one run. Not a
//! test: it prints figures and asserts no timings. Run as root; see
//! doc/benchmarks-moves.md.
//!
//! Three real members on loopback that share one pool (`FERRY_SHARED_POOL`):
//! m1 runs with `FERRY_TARGET_LISTENS=0` (it starts QEMU's migration at
//! once, as ferry before the feature), m2 and m3 with the default. For each
//! guest (`testvm`, `limits.memory=1GiB`, `testvm.dirty_mib` = each value of
//! `--dirty-mib`) one VM is launched on m1 and moved m1 → m2 (at once),
//! m2 → m3 and m3 → m1 (waiting) every repetition: every move's target QEMU
//! starts while the previous move's source QEMU has just gone, alike.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_test::bench::{self, Args, Host};
use ferry_test::{form_cluster, Member};
use serde_json::Value;

const USAGE: &str = "usage: shared-move-bench [--reps N] [--dirty-mib LIST]

  --reps N          repetitions (default 6)
  --dirty-mib LIST  the guests' hot sets in MiB, one VM each (default 0,64;
                    0 = an idle guest)";

const VM_MEMORY: &str = "1GiB";
const MOVE_TIMEOUT: Duration = Duration::from_secs(300);
const METRICS: [(&str, &str); 5] = [
    ("downtime_ms", "downtime (STOP → RESUME)"),
    ("qemu_downtime_ms", "QEMU downtime"),
    ("total_ms", "total"),
    ("qemu_total_ms", "QEMU total"),
    ("listen_wait_ms", "waiting for the target's QEMU"),
];

struct Opts {
    reps: usize,
    dirty: Vec<usize>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 6,
        dirty: vec![0, 64],
    };
    let mut args = Args::from_env("shared-move-bench", USAGE);
    while let Some(a) = args.next_arg() {
        match a.as_str() {
            "--reps" => o.reps = args.positive("--reps"),
            "--dirty-mib" => {
                let v: String = args.value("--dirty-mib");
                o.dirty = v
                    .split(',')
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|_| args.bad(format!("--dirty-mib 0,64, not {v:?}")));
            }
            "-h" | "--help" => args.help(),
            other => args.unknown(other),
        }
    }
    o
}

/// The figures of one move from its operation's metadata.
fn figures(meta: &Value) -> BTreeMap<&'static str, f64> {
    let num = |v: &Value| v.as_f64();
    let stage_at = |stage: &str| {
        meta["timeline"]
            .as_array()?
            .iter()
            .find(|e| e["stage"] == stage)
            .and_then(|e| e["at_ms"].as_f64())
    };
    let wait = stage_at("the target's QEMU listens")
        .zip(stage_at("waiting for the target's QEMU to listen"))
        .map(|(end, start)| end - start);
    let mut f = BTreeMap::new();
    for (k, v) in [
        ("downtime_ms", num(&meta["downtime_ms"])),
        ("qemu_downtime_ms", num(&meta["qemu"]["downtime_ms"])),
        ("total_ms", num(&meta["total_ms"])),
        ("qemu_total_ms", num(&meta["qemu"]["total_ms"])),
        ("listen_wait_ms", wait),
    ] {
        if let Some(v) = v {
            f.insert(k, v);
        }
    }
    f
}

type Samples = BTreeMap<&'static str, Vec<f64>>;

async fn move_vm(from: &Member, to: &Member, into: &mut Samples) {
    let args = ["move", "v1", "--target", &to.name, "--format", "json"];
    let (out, _) = bench::ferry_cli(from, &args, MOVE_TIMEOUT, "\n")
        .await
        .unwrap_or_else(|e| panic!("move {} -> {}: {e}", from.name, to.name));
    let meta: Value = serde_json::from_str(out.trim()).expect("JSON from ferry move");
    let f = figures(&meta);
    eprintln!("  {} -> {}: {f:?}", from.name, to.name);
    for (k, v) in f {
        into.entry(k).or_default().push(v);
    }
}

fn row(name: &str, s: &Samples) -> String {
    let mut r = format!("| {name} |");
    for (k, _) in METRICS {
        let v = bench::sorted(s.get(k).cloned().unwrap_or_default());
        r.push_str(&format!(" {} |", bench::spread(&v, 0)));
    }
    r
}

fn main() {
    let o = parse_args();
    bench::require_root("shared-move-bench starts ferryd members and QEMU: run it as root");
    if let Some(why) = bench::skip_vm() {
        eprintln!("shared-move-bench: no VMs here: {why}");
        std::process::exit(1);
    }
    let host = Host::probe();
    bench::runtime().block_on(async {
        let pool = ferry_test::shared_pool_dir();
        let p = pool.path().to_str().unwrap().to_string();
        let ms = vec![
            Member::start_with_env(
                "m1",
                &[("FERRY_SHARED_POOL", &p), ("FERRY_TARGET_LISTENS", "0")],
            ),
            Member::start_with_env("m2", &[("FERRY_SHARED_POOL", &p)]),
            Member::start_with_env("m3", &[("FERRY_SHARED_POOL", &p)]),
        ];
        form_cluster(&ms);
        println!(
            "shared-move-bench: {}, {}, load {}",
            host.describe(),
            bench::commit(),
            bench::loadavg()
        );
        println!(
            "\n| guest | variant | {} |",
            METRICS.map(|(_, h)| h).join(" | ")
        );
        println!("|---|---|{}", "---:|".repeat(METRICS.len()));
        for dirty in &o.dirty {
            let cfg = [
                format!("limits.memory={VM_MEMORY}"),
                format!("testvm.dirty_mib={dirty}"),
            ];
            let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
            ms[0].launch_in("testvm", "v1", "m1", Some("shared"), &cfg);
            ferry_test::wait_guest(&ms[0].shared_spec("v1", true, pool.path())).await;
            let (mut at_once, mut waiting) = (Samples::new(), Samples::new());
            for rep in 0..o.reps {
                eprintln!("dirty_mib={dirty} repetition {}", rep + 1);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                move_vm(&ms[0], &ms[1], &mut at_once).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                move_vm(&ms[1], &ms[2], &mut waiting).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                move_vm(&ms[2], &ms[0], &mut waiting).await;
            }
            ms[0].ferry_ok(&["delete", "--force", "v1"]);
            let guest = format!("{VM_MEMORY}, hot set {dirty} MiB");
            println!("{}", row(&format!("{guest} | at once (m1 → m2)"), &at_once));
            println!(
                "{}",
                row(&format!("{guest} | waiting (m2 → m3, m3 → m1)"), &waiting)
            );
        }
    });
}
