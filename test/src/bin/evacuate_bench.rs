//! `evacuate-bench`: wall time of a cluster evacuation against the slowest
//! single move of the same instances (issue 6). Not a test: it prints figures
//! and asserts no timings. Run as root, see `scripts/bench-evacuate.sh` and
//! doc/benchmarks-evacuation.md.
//!
//! Three real members m1, m2, m3 (`ferry_test::Member`, loopback), one
//! cluster per configuration (m1 started with `FERRY_EVACUATE_PARALLEL=P`).
//! On m1: 4 busybox containers and 4 `testvm` VMs (`limits.memory=128MiB`;
//! the VMs are left out, with a note, without /dev/kvm, QEMU or nasm).
//! Every repetition:
//! 1. single moves: each instance on its own, one after another, `ferry move
//!    NAME --target m2 --format json` sent to m1, timed on the client (spawn
//!    to exit), then moved back to m1 at once, untimed;
//! 2. `ferry cluster evacuate m1 --action live-migrate --force --format
//!    json`, timed; the report must have every instance moved live, none
//!    failed (the bench panics with the report otherwise);
//! 3. `ferry cluster restore m1 --force --format json`, timed, checked alike.
//!
//! Between the steps every instance must count again where it runs and every
//! member must be online.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::vm::VmDriver;
use ferry_test::bench::{self, Args, Doc, Host, Run};
use ferry_test::{cluster_members, form_cluster, location, Member};
use serde_json::Value;

const USAGE: &str = "usage: evacuate-bench [--reps N] [--parallel P[,P...]] [--no-vm] [--write-doc PATH] [--command TEXT]

  --reps N          repetitions per configuration (default 3)
  --parallel LIST   m1's FERRY_EVACUATE_PARALLEL, one cluster per value
                    (default 2,4; 2 is ferryd's default)
  --no-vm           containers only
  --write-doc PATH  also write the results into PATH (markdown; replaces the
                    generated section between its markers, keeps the rest)
  --command TEXT    the command line to record in the doc (default: this one)";

const CONTAINERS: usize = 4;
const VMS: usize = 4;
const VM_MEMORY: &str = "128MiB";
/// One single move may take this long before the bench gives up.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);
/// The same for a whole evacuation or restore.
const EVACUATE_TIMEOUT: Duration = Duration::from_secs(1800);

struct Opts {
    reps: usize,
    parallel: Vec<usize>,
    vm: bool,
    write_doc: Option<PathBuf>,
    command: Option<String>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 3,
        parallel: vec![2, 4],
        vm: true,
        write_doc: None,
        command: None,
    };
    let mut args = Args::from_env("evacuate-bench", USAGE);
    while let Some(a) = args.next_arg() {
        match a.as_str() {
            "--reps" => o.reps = args.positive("--reps"),
            "--parallel" => o.parallel = args.positive_list("--parallel", "2,4"),
            "--no-vm" => o.vm = false,
            "--write-doc" => o.write_doc = Some(args.path("--write-doc")),
            "--command" => o.command = Some(args.value("--command")),
            "-h" | "--help" => args.help(),
            other => args.unknown(other),
        }
    }
    o
}

// ---------------------------------------------------------------- figures

/// One configuration's figures: metric -> one value per repetition.
struct Config {
    parallel: usize,
    samples: BTreeMap<&'static str, Vec<f64>>,
    /// Where the evacuations put the instances: member -> count, all reps.
    placed: BTreeMap<String, usize>,
    /// Move paths seen (single moves and evacuations): path -> count.
    paths: BTreeMap<String, usize>,
}

impl Config {
    fn add(&mut self, metric: &'static str, v: f64) {
        self.samples.entry(metric).or_default().push(v);
    }

    fn sorted(&self, metric: &str) -> Vec<f64> {
        bench::sorted(self.samples.get(metric).cloned().unwrap_or_default())
    }

    /// "median (min–max)", or "–".
    fn cell(&self, metric: &str, decimals: usize) -> String {
        bench::spread(&self.sorted(metric), decimals)
    }
}

fn median_of(v: Vec<f64>) -> f64 {
    bench::median(&bench::sorted(v)).unwrap_or(f64::NAN)
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

// ---------------------------------------------------------------- helpers

struct Inst {
    name: String,
    vm: bool,
}

/// Run the `ferry` CLI against `m`, bounded by `limit`: stdout and the wall
/// time from spawning the client to its exit.
async fn ferry(m: &Member, args: &[&str], limit: Duration) -> Result<(String, Duration), String> {
    bench::ferry_cli(m, args, limit, "\n").await
}

/// [`ferry`] that must succeed and print JSON; panics otherwise (a benchmark
/// of a broken run is worthless; the members print their logs on drop).
async fn ferry_json(m: &Member, args: &[&str], limit: Duration) -> (Value, Duration) {
    let (out, wall) = ferry(m, args, limit)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let v = serde_json::from_str(out.trim())
        .unwrap_or_else(|err| panic!("ferry {args:?}: output {out:?} is not JSON: {err}"));
    (v, wall)
}

fn member<'a>(ms: &'a [Member], name: &str) -> &'a Member {
    ms.iter().find(|m| m.name == name).unwrap()
}

async fn counter(m: &Member, i: &Inst) -> Option<u64> {
    if i.vm {
        VmDriver::default()
            .read_counter(&m.spec(&i.name, true))
            .await
            .ok()
    } else {
        let p = m.spec(&i.name, false).paths.volume.join("rootfs/counter");
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }
}

/// Wait until `i`'s counter advances on `m` (it runs there, not frozen);
/// panics after 60 s.
async fn counting(m: &Member, i: &Inst) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    loop {
        let n = counter(m, i).await;
        match (first, n) {
            (None, Some(n)) => first = Some(n),
            (Some(f), Some(n)) if n > f => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{} does not count on {} (counter {first:?}, then {n:?})",
            i.name,
            m.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every instance runs (counts) on `at`, and the cluster places it there.
async fn all_counting_on(ms: &[Member], insts: &[Inst], at: &str) {
    for i in insts {
        let loc = location(&ms[0], &i.name);
        assert_eq!(loc.as_deref(), Some(at), "{} is not on {at}", i.name);
        counting(member(ms, at), i).await;
    }
}

/// Every member is online, `evacuated` (if any) is `Evacuated`.
fn members_ok(ms: &[Member], evacuated: Option<&str>) {
    let list = cluster_members(&ms[0]);
    assert_eq!(list.len(), ms.len(), "cluster list: {list:?}");
    for x in &list {
        let want = if x["server_name"].as_str() == evacuated {
            "Evacuated"
        } else {
            "Online"
        };
        assert_eq!(x["status"], want, "member {}: {x}", x["server_name"]);
    }
}

/// The evacuation / restore report must list every instance `status` (all
/// live for an evacuation) with none failed; panics with the report.
fn check_report(r: &Value, n: usize, parallel: usize, what: &str) {
    let entries = r["instances"].as_array().cloned().unwrap_or_default();
    let moved = entries.iter().filter(|e| e["status"] == "moved").count();
    let live = entries
        .iter()
        .all(|e| e["path"].as_str().is_some_and(|p| p.starts_with("live")));
    let ok = r["total"].as_u64() == Some(n as u64)
        && r["failed"].as_u64() == Some(0)
        && moved == n
        && live
        && r["parallel"].as_u64() == Some(parallel as u64);
    assert!(
        ok,
        "{what}: expected {n} instances moved live, 0 failed, parallel {parallel}; report:\n{}",
        serde_json::to_string_pretty(r).unwrap_or_default()
    );
}

// ---------------------------------------------------------------- the run

/// Launch the instances on m1 and wait until they all count.
async fn launch(ms: &[Member], insts: &[Inst]) {
    let mem = format!("limits.memory={VM_MEMORY}");
    for i in insts {
        let mut args = vec![
            "launch",
            if i.vm { "testvm" } else { "busybox" },
            &i.name,
            "--target",
            "m1",
        ];
        if i.vm {
            args.extend_from_slice(&["--vm", "-c", &mem]);
        }
        ferry(&ms[0], &args, Duration::from_secs(180))
            .await
            .unwrap_or_else(|err| panic!("launch {}: {err}", i.name));
    }
    all_counting_on(ms, insts, "m1").await;
}

async fn repetition(ms: &[Member], insts: &[Inst], cfg: &mut Config, rep: usize) {
    let n = insts.len();
    let p = cfg.parallel;
    // 1. Single moves m1 -> m2, each moved back untimed before the next.
    let (mut walls, mut totals, mut downs) = (vec![], vec![], vec![]);
    let (mut ct, mut vm) = (vec![], vec![]);
    for i in insts {
        counting(&ms[0], i).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let args = ["move", &i.name, "--target", "m2", "--format", "json"];
        let (meta, wall) = ferry_json(&ms[0], &args, MOVE_TIMEOUT).await;
        let path = meta["path"].as_str().unwrap_or("?").to_string();
        assert!(
            path.starts_with("live"),
            "{}: not a live move: {meta}",
            i.name
        );
        *cfg.paths.entry(path).or_default() += 1;
        let wall = bench::ms(wall);
        walls.push(wall);
        totals.push(meta["total_ms"].as_f64().unwrap_or(f64::NAN));
        downs.push(meta["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        if i.vm {
            vm.push(wall);
        } else {
            ct.push(wall);
        }
        eprintln!(
            "    {} m1 → m2: {wall:.0} ms wall, total_ms {}, downtime_ms {}",
            i.name, meta["total_ms"], meta["downtime_ms"]
        );
        counting(&ms[1], i).await;
        let back = ["move", &i.name, "--target", "m1", "--format", "json"];
        ferry_json(&ms[1], &back, MOVE_TIMEOUT).await;
        counting(&ms[0], i).await;
    }
    members_ok(ms, None);
    let slowest = max_of(&walls);
    let bound = slowest * n.div_ceil(p) as f64;
    cfg.add("slowest", slowest);
    cfg.add("sum", walls.iter().sum());
    cfg.add("slowest_total", max_of(&totals));
    cfg.add("single_downtime", median_of(downs));
    if !ct.is_empty() {
        cfg.add("ct_single", median_of(ct));
    }
    if !vm.is_empty() {
        cfg.add("vm_single", median_of(vm));
    }

    // 2. Evacuation.
    all_counting_on(ms, insts, "m1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let args = [
        "cluster",
        "evacuate",
        "m1",
        "--action",
        "live-migrate",
        "--force",
        "--format",
        "json",
    ];
    let (report, evac) = ferry_json(&ms[0], &args, EVACUATE_TIMEOUT).await;
    check_report(&report, n, p, "evacuation");
    members_ok(ms, Some("m1"));
    let entries = report["instances"].as_array().unwrap();
    let mut e_totals = vec![];
    let mut e_downs = vec![];
    for e in entries {
        let to = e["to"].as_str().unwrap_or("?").to_string();
        let i = insts.iter().find(|i| e["name"] == i.name.as_str()).unwrap();
        assert_eq!(location(&ms[1], &i.name).as_deref(), Some(to.as_str()));
        counting(member(ms, &to), i).await;
        *cfg.placed.entry(to).or_default() += 1;
        *cfg.paths
            .entry(e["path"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        e_totals.push(e["total_ms"].as_f64().unwrap_or(f64::NAN));
        e_downs.push(e["downtime_ms"].as_f64().unwrap_or(f64::NAN));
    }
    let evac = bench::ms(evac);
    cfg.add("evac", evac);
    cfg.add("bound", bound);
    cfg.add("ratio", evac / bound);
    cfg.add("evac_vs_sum", evac / walls.iter().sum::<f64>());
    cfg.add("evac_inst_total_max", max_of(&e_totals));
    cfg.add("evac_inst_total_med", median_of(e_totals));
    cfg.add("evac_downtime", median_of(e_downs));

    // 3. Restore.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let args = ["cluster", "restore", "m1", "--force", "--format", "json"];
    let (report, restore) = ferry_json(&ms[0], &args, EVACUATE_TIMEOUT).await;
    check_report(&report, n, p, "restore");
    members_ok(ms, None);
    all_counting_on(ms, insts, "m1").await;
    let restore = bench::ms(restore);
    cfg.add("restore", restore);
    eprintln!(
        "  [parallel {p}] rep {}: slowest single {slowest:.0} ms, sum {:.0} ms, evacuation {evac:.0} ms, \
         bound {bound:.0} ms, ratio {:.2}, restore {restore:.0} ms",
        rep + 1,
        walls.iter().sum::<f64>(),
        evac / bound
    );
}

async fn run_config(insts: &[Inst], parallel: usize, reps: usize) -> Config {
    eprintln!(
        "== parallel {parallel}: forming a cluster m1 (FERRY_EVACUATE_PARALLEL={parallel}), m2, m3"
    );
    let p = parallel.to_string();
    let ms = vec![
        Member::start_with_env("m1", &[("FERRY_EVACUATE_PARALLEL", &p)]),
        Member::start("m2"),
        Member::start("m3"),
    ];
    form_cluster(&ms);
    eprintln!(
        "== parallel {parallel}: launching {} instances on m1",
        insts.len()
    );
    launch(&ms, insts).await;
    let mut cfg = Config {
        parallel,
        samples: BTreeMap::new(),
        placed: BTreeMap::new(),
        paths: BTreeMap::new(),
    };
    for rep in 0..reps {
        eprintln!("== parallel {parallel}, repetition {}/{reps}", rep + 1);
        repetition(&ms, insts, &mut cfg, rep).await;
    }
    eprintln!("== parallel {parallel}: tearing down");
    drop(ms);
    cfg
}

// ---------------------------------------------------------------- report

struct Report {
    run: Run,
    machine: String,
    versions: String,
    kvm: String,
    reps: usize,
    n_ct: usize,
    n_vm: usize,
    vm_skip: Option<String>,
    configs: Vec<Config>,
}

/// The results table: (label, metric, decimals).
#[rustfmt::skip]
const ROWS: &[(&str, &str, usize)] = &[
    ("slowest single move", "slowest", 0),
    ("sum of the single moves", "sum", 0),
    ("single move, container (median of the 4 in a rep)", "ct_single", 0),
    ("single move, VM (median of the 4 in a rep)", "vm_single", 0),
    ("single move, slowest `total_ms` (daemon's)", "slowest_total", 0),
    ("single move, `downtime_ms` (median of a rep)", "single_downtime", 0),
    ("**evacuation** (`cluster evacuate m1 --action live-migrate`)", "evac", 0),
    ("bound = slowest single × ⌈n / parallel⌉", "bound", 0),
    ("**ratio evacuation / bound** (goal ≤ 1.3)", "ratio", 2),
    ("evacuation / sum of the single moves", "evac_vs_sum", 2),
    ("evacuation: slowest instance `total_ms`", "evac_inst_total_max", 0),
    ("evacuation: median instance `total_ms`", "evac_inst_total_med", 0),
    ("evacuation: median instance `downtime_ms`", "evac_downtime", 0),
    ("restore (`cluster restore m1`, for information)", "restore", 0),
];

fn render(r: &Report) -> String {
    let mut s = String::new();
    let n = r.n_ct + r.n_vm;
    let run = &r.run;
    let _ = writeln!(s, "{}", run.heading());
    let _ = writeln!(s, "- command: `{}`", run.command);
    let _ = writeln!(
        s,
        "- ferry: {}, `{}` build; {} repetitions per configuration; the run took {:.0} s",
        run.commit,
        run.profile,
        r.reps,
        run.took.as_secs_f64()
    );
    let _ = writeln!(s, "- machine: {}; {}", r.machine, r.kvm);
    let _ = writeln!(s, "- {}", r.versions);
    let _ = writeln!(s, "{}", run.load_line());
    let vms = match &r.vm_skip {
        None => format!(" + {} `testvm` VMs (`limits.memory={VM_MEMORY}`)", r.n_vm),
        Some(why) => format!(" (**VMs skipped**: {why})"),
    };
    let _ = writeln!(
        s,
        "- workload: {} busybox containers{vms} on m1; single moves m1 → m2, evacuation to m2 + m3",
        r.n_ct
    );
    let _ = writeln!(
        s,
        "- figures: median (min–max) over the repetitions, ms of client wall time unless named otherwise\n"
    );
    let heads: Vec<String> = r
        .configs
        .iter()
        .map(|c| format!("parallel {}", c.parallel))
        .collect();
    let _ = writeln!(s, "| figure | {} |", heads.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(r.configs.len()));
    for (label, metric, dec) in ROWS {
        let cells: Vec<String> = r.configs.iter().map(|c| c.cell(metric, *dec)).collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    let col = |f: &dyn Fn(&Config) -> String| -> String {
        r.configs.iter().map(f).collect::<Vec<_>>().join(" | ")
    };
    let _ = writeln!(
        s,
        "| ⌈n / parallel⌉ (n = {n}) | {} |",
        col(&|c| n.div_ceil(c.parallel).to_string())
    );
    let list = |m: &BTreeMap<String, usize>| -> String {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        s,
        "| evacuation targets (all reps) | {} |",
        col(&|c| list(&c.placed))
    );
    let _ = writeln!(
        s,
        "| move paths (all moves timed) | {} |",
        col(&|c| list(&c.paths))
    );
    let _ = writeln!(
        s,
        "\nGoal (evacuation ≤ 1.3 × slowest single × ⌈n / parallel⌉):\n"
    );
    for c in &r.configs {
        let v = c.sorted("ratio");
        let (med, worst) = (bench::median(&v), v.last().copied());
        let verdict = match med {
            Some(x) if x <= 1.3 => "**met**",
            Some(_) => "**not met**",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "- parallel {}: median ratio {} (worst repetition {}) — {verdict}",
            c.parallel,
            med.map(|x| format!("{x:.2}")).unwrap_or("–".into()),
            worst.map(|x| format!("{x:.2}")).unwrap_or("–".into()),
        );
    }
    s
}

/// The doc `--write-doc` writes: one section per build profile.
const DOC: Doc = Doc {
    bench: "evacuate-bench",
    intro: "# Benchmark: cluster evacuation

Generated by `scripts/bench-evacuate.sh` (`test/src/bin/evacuate_bench.rs`);
the section between the markers below is rewritten by every run, the rest of
this file is kept.
",
};

// ---------------------------------------------------------------- main

fn main() {
    let o = parse_args();
    bench::require_root("evacuate-bench: SKIPPED: needs root (namespaces, CRIU, KVM); run scripts/bench-evacuate.sh as root");
    std::process::exit(bench::runtime().block_on(run(o)));
}

async fn run(o: Opts) -> i32 {
    let run = Run::start("evacuate-bench", o.command.clone());
    let vm_skip = if o.vm {
        bench::skip_vm()
    } else {
        Some("not selected (--no-vm)".into())
    };
    let kvm = if Path::new("/dev/kvm").exists() {
        "KVM (/dev/kvm present)"
    } else {
        "no /dev/kvm (VMs skipped)"
    };
    let n_vm = if vm_skip.is_none() { VMS } else { 0 };
    let mut insts: Vec<Inst> = (1..=CONTAINERS)
        .map(|k| Inst {
            name: format!("c{k}"),
            vm: false,
        })
        .collect();
    insts.extend((1..=n_vm).map(|k| Inst {
        name: format!("v{k}"),
        vm: true,
    }));
    eprintln!(
        "== evacuate-bench: {} reps, parallel {:?}, {} instances; binaries in {}; load {}",
        o.reps,
        o.parallel,
        insts.len(),
        run.bin.display(),
        run.load_before
    );
    if let Some(why) = &vm_skip {
        eprintln!("SKIP VMs: {why}");
    }
    let mut report = Report {
        run,
        machine: Host::probe().describe(),
        versions: format!("{}; CRIU {}", bench::qemu_version(), bench::criu_version()),
        kvm: kvm.into(),
        reps: o.reps,
        n_ct: CONTAINERS,
        n_vm,
        vm_skip,
        configs: vec![],
    };
    for &p in &o.parallel {
        report.configs.push(run_config(&insts, p, o.reps).await);
        report.run.finish();
        // Shown now too, so a later configuration's failure does not lose it.
        eprintln!("{}", render(&report));
    }
    let text = render(&report);
    DOC.publish(o.write_doc.as_deref(), &report.run.profile, &text)
}
