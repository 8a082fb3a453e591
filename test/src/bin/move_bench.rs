//! `move-bench`: downtime, total time and throughput of ferry's moves next to
//! the raw CRIU / QEMU paths they are built on, measured side by side in one
//! run (not a test; run as root, see `scripts/bench-move.sh` and
//! doc/benchmarks-moves.md).
//!
//! Containers (issue 4): a busybox container running `/dirty 100 10`, a tiny
//! static C program built here with `gcc -static -O2` that mallocs 100 MiB,
//! fills it and then rewrites one byte of every page every ~10 ms.
//! - (a) raw CRIU, pages to files: `migrate_dump_with(PagesTo::Files)`, the
//!   images directory copied, `migrate_restore` from the copy (LXD's path);
//! - (b) raw CRIU, local dump + restore from the same directory (the floor);
//! - (c) ferry's live move between two real `ferryd` members;
//! - (d) ferry's post-copy move (`--postcopy`, CRIU lazy pages).
//!
//! (a) and (b) use the container driver directly on two specs ("members") in a
//! temp dir that share the volume (like drivers/tests/container_migrate.rs
//! `move_shared_volume`), so no root filesystem is copied: they time CRIU and
//! the image copy only.
//!
//! VMs (issue 5): the test guest (`testvm`, `limits.memory=1GiB`,
//! `testvm.dirty_mib=64`: a 64 MiB hot set rewritten continuously).
//! - (a) raw QEMU-to-QEMU over two socketpairs and a relay
//!   (`migrate_incoming` / `migrate_outgoing`, ferry's default parameters;
//!   the disk is copied before, no block mirror);
//! - (b) ferry's live move with its defaults (adaptive zstd on the state stream);
//! - (b0) the same with `--compression none` (the transport's own cost);
//! - (c) ferry's live move with Incus/LXD-like settings (`--bandwidth 128MiB
//!   --max-downtime 300 --downtime-target 300 --compression none`: QEMU's
//!   own switch-over, no compression);
//! - (d) ferry's stateful-stop fallback: the move to a member started with
//!   `FERRY_MIGRATION_PROTOCOL=1`.
//!
//! Every repetition runs every variant once, in that order, except that
//! (b) and (b0) swap places every other repetition; only one container /
//! one VM exists at a time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_drivers::container::{forkstart_main, ContainerDriver, PagesTo};
use ferry_drivers::vm::migrate::MigrateParams;
use ferry_drivers::vm::mirror::MirrorParams;
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{InstancePaths, InstanceSpec, InstanceType, Lifecycle, OpCtx};
use ferry_test::bench::{self, ms, sh, Args, Doc, Host, Run};
use ferry_test::Member;
use serde_json::Value;

#[path = "move_bench/raw_relay.rs"]
mod raw_relay;

const USAGE: &str =
    "usage: move-bench [--reps N] [--only container|vm] [--write-doc PATH] [--command TEXT]

  --reps N          repetitions of every variant (default 5)
  --only KIND       run only the container or only the VM part
  --write-doc PATH  also write the results into PATH (markdown; replaces the
                    generated section between its markers, keeps the rest)
  --command TEXT    the command line to record in the doc (default: this one)";

const MIB: u64 = 1 << 20;
/// Container: memory the dirtier holds, and the pause between its passes.
const DIRTY_MIB: u64 = 100;
const DIRTY_INTERVAL_MS: u64 = 10;
const CT_MEMORY: &str = "256MiB";
/// VM: RAM and the hot set the guest rewrites.
const VM_MEMORY: &str = "1GiB";
const VM_DIRTY_MIB: &str = "64";
/// One ferry move may take this long before the bench gives up on it.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);

const DIRTY_C: &str = r#"
/* dirty MIB INTERVAL_MS: hold MIB MiB of anonymous memory, fill it with
   pseudo-random bytes, then rewrite one byte of every page, pause
   INTERVAL_MS, forever. Built static by move-bench. It closes every fd
   first: what the exec session handed down (the host's /dev/null, pipes)
   lives outside the container's mounts and CRIU could not dump it. */
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int fd = 0; fd < 1024; fd++) close(fd);
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 100;
    long ms = argc > 2 ? strtol(argv[2], 0, 10) : 10;
    size_t n = mib << 20;
    volatile uint64_t *p = malloc(n);
    if (!p) return 1;
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < n / 8; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    for (uint64_t pass = 1;; pass++) {
        for (size_t i = 0; i < n / 8; i += 512) p[i] ^= pass;
        if (ms > 0) nanosleep(&ts, 0);
    }
}
"#;

struct Opts {
    reps: usize,
    container: bool,
    vm: bool,
    write_doc: Option<PathBuf>,
    command: Option<String>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        reps: 5,
        container: true,
        vm: true,
        write_doc: None,
        command: None,
    };
    let mut args = Args::from_env("move-bench", USAGE);
    while let Some(a) = args.next_arg() {
        match a.as_str() {
            "--reps" => o.reps = args.positive("--reps"),
            "--only" => match args.value("--only").as_str() {
                "container" => o.vm = false,
                "vm" => o.container = false,
                x => args.bad(format!("--only container|vm, not {x:?}")),
            },
            "--write-doc" => o.write_doc = Some(args.path("--write-doc")),
            "--command" => o.command = Some(args.value("--command")),
            "-h" | "--help" => args.help(),
            other => args.unknown(other),
        }
    }
    o
}

// ---------------------------------------------------------------- results

/// One variant's samples over the repetitions: metric name -> value per rep.
struct Series {
    key: &'static str,
    label: String,
    samples: Vec<BTreeMap<&'static str, f64>>,
    /// The repetition (0-based) each sample comes from.
    reps: Vec<usize>,
    errors: Vec<String>,
}

impl Series {
    fn new(key: &'static str, label: impl Into<String>) -> Series {
        Series {
            key,
            label: label.into(),
            samples: Vec::new(),
            reps: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn record(&mut self, rep: usize, r: Result<BTreeMap<&'static str, f64>, String>) {
        match r {
            Ok(s) => {
                let line: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v:.1}")).collect();
                eprintln!("  [{}] rep {}: {}", self.key, rep + 1, line.join(" "));
                self.samples.push(s);
                self.reps.push(rep);
            }
            Err(e) => {
                eprintln!("  [{}] rep {}: FAILED: {e}", self.key, rep + 1);
                self.errors.push(format!("rep {}: {e}", rep + 1));
            }
        }
    }

    /// The metric's values over the successful repetitions, sorted.
    fn values(&self, metric: &str) -> Vec<f64> {
        bench::sorted(
            self.samples
                .iter()
                .filter_map(|s| s.get(metric).copied())
                .collect(),
        )
    }

    fn median(&self, metric: &str) -> Option<f64> {
        bench::median(&self.values(metric))
    }

    /// "median (min–max)", or "–".
    fn cell(&self, metric: &str, decimals: usize) -> String {
        bench::spread(&self.values(metric), decimals)
    }

    /// `metric` of this series over `other`'s, within each repetition both
    /// ran (the variants of a repetition run back to back), sorted.
    fn paired_ratios(&self, other: &Series, metric: &str) -> Vec<f64> {
        let theirs = |rep: usize| {
            let i = other.reps.iter().position(|r| *r == rep)?;
            other.samples[i].get(metric).copied()
        };
        bench::sorted(
            self.reps
                .iter()
                .zip(&self.samples)
                .filter_map(|(&rep, ours)| ratio(ours.get(metric).copied(), theirs(rep)))
                .collect(),
        )
    }
}

/// "- paired …: median (min–max) of the per-repetition ratio; the goal held
/// in k of n repetitions" (`holds` judges one ratio).
fn paired_line(what: &str, ratios: &[f64], holds: impl Fn(f64) -> bool) -> String {
    format!(
        "- paired, {what} within each repetition: {}; the goal held in {} of {} repetitions",
        bench::spread(ratios, 2),
        ratios.iter().filter(|r| holds(**r)).count(),
        ratios.len()
    )
}

// ---------------------------------------------------------------- helpers

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Build the dirtier with `gcc -static -O2` into `dir`.
fn build_dirty(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("dirty.c");
    let bin = dir.join("dirty");
    std::fs::write(&src, DIRTY_C).map_err(e("write dirty.c"))?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(e("run gcc"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc -static -O2 dirty.c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

fn install_dirty(bin: &Path, rootfs: &Path) -> Result<(), String> {
    let to = rootfs.join("dirty");
    std::fs::copy(bin, &to).map_err(e("copy dirty into the rootfs"))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).map_err(e("chmod dirty"))
}

/// The shell command (inside the container) that starts the dirtier in the
/// background, detached from the exec session.
fn dirty_cmd() -> String {
    format!("/dirty {DIRTY_MIB} {DIRTY_INTERVAL_MS} </dev/null >/dev/null 2>&1 &")
}

fn stat_fields(pid: u32) -> Option<(String, char, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = s.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Resident MiB of the `dirty` process whose parent is `init` (host pids).
fn dirty_rss_mib(init: u32) -> Option<u64> {
    for ent in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((comm, state, ppid)) = stat_fields(pid) else {
            continue;
        };
        if comm == "dirty" && ppid == init && state != 'Z' {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
            return Some(kb / 1024);
        }
    }
    None
}

/// Wait until the dirtier under `init` holds (nearly) all its memory.
async fn wait_dirty(init: u32, secs: u64) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(r) = dirty_rss_mib(init) {
            if r + 2 >= DIRTY_MIB {
                return Ok(r);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the dirtier under pid {init} does not hold {DIRTY_MIB} MiB (rss {:?} MiB)",
                dirty_rss_mib(init)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run the `ferry` CLI against `m`, bounded by `limit`; stdout on success.
async fn ferry(m: &Member, args: &[&str], limit: Duration) -> Result<String, String> {
    // A failure names stderr and stdout with nothing between, as move-bench
    // always has (its messages go into the doc).
    let (stdout, _) = bench::ferry_cli(m, args, limit, "").await?;
    Ok(stdout)
}

/// `ferry delete --force NAME` on `m`; a failure is only reported.
async fn delete(m: &Member, name: &str) {
    let args = ["delete", "--force", name];
    if let Err(err) = ferry(m, &args, Duration::from_secs(60)).await {
        eprintln!("  (delete {name}: {err})");
    }
}

/// `ferry move NAME --target T [extra] --format json` sent to `via`; the
/// operation's metadata.
async fn ferry_move(
    via: &Member,
    name: &str,
    target: &str,
    extra: &[&str],
) -> Result<Value, String> {
    let mut args = vec!["move", name, "--target", target];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--format", "json"]);
    let out = ferry(via, &args, MOVE_TIMEOUT).await?;
    serde_json::from_str(out.trim()).map_err(|err| format!("move output {out:?}: {err}"))
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut x = v;
    for p in path {
        x = x.get(p)?;
    }
    x.as_f64()
}

// ---------------------------------------------------------------- containers

/// A spec for the raw (driver-only) runs: everything under `root`, the
/// volume in `root/VOLUMES/NAME`.
fn raw_spec(
    root: &Path,
    volumes: &str,
    name: &str,
    (kind, image): (InstanceType, &str),
    config: BTreeMap<String, String>,
) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        kind,
        image: image.into(),
        config,
        volatile: BTreeMap::new(),
        paths: InstancePaths {
            volume: root.join(volumes).join(name),
            run: root.join("run").join(name),
            logs: root.join("logs").join(name),
            images: root.join("images"),
        },
    }
}

fn ct_spec(member: &Path, name: &str) -> InstanceSpec {
    let config = [("limits.memory".to_string(), CT_MEMORY.to_string())].into();
    raw_spec(
        member,
        "volumes",
        name,
        (InstanceType::Container, "busybox"),
        config,
    )
}

/// The ferry cgroups of instance `name` on any hierarchy.
fn ferry_cgroups(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/memory",
    ]
    .iter()
    .filter_map(|h| std::fs::read_dir(Path::new(h).join("ferry")).ok())
    .flatten()
    .filter_map(|e| e.ok())
    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    .map(|e| e.path())
    .collect()
}

/// Kills and unmounts what a raw container run left, also on failure.
struct CtCleanup(Vec<InstanceSpec>);

impl Drop for CtCleanup {
    fn drop(&mut self) {
        for s in &self.0 {
            for f in ["init.pid", "criu-restore.pid"] {
                if let Some(pid) = std::fs::read_to_string(s.paths.run.join(f))
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<i32>().ok())
                {
                    if pid > 1 {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for s in &self.0 {
            for m in [s.paths.run.join("rootfs"), s.paths.volume.join("rootfs")] {
                for _ in 0..4 {
                    let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            for dir in ferry_cgroups(&s.name) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Copy the files of `src` (flat, as CRIU writes them) into `dst`; bytes.
fn copy_images(src: &Path, dst: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(dst).map_err(e("mkdir images copy"))?;
    let mut bytes = 0;
    for ent in std::fs::read_dir(src).map_err(e("read images"))? {
        let ent = ent.map_err(e("read images"))?;
        bytes += std::fs::copy(ent.path(), dst.join(ent.file_name())).map_err(e("copy image"))?;
    }
    Ok(bytes)
}

/// How a raw CRIU move gets its images to the restoring side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawPages {
    /// Restore from the dump's own directory (the floor).
    Local,
    /// Copy the images directory, restore from the copy (LXD's path).
    CopyDir,
    /// Pages to a local `criu page-server` over two socketpairs joined by a
    /// plain relay (ferry's transport without the network), the other
    /// images copied.
    PageServer,
}

/// Raw CRIU move of a fresh container between two specs sharing its volume:
/// dump, get the images across as `pages` says, restore.
async fn raw_container(
    d: &ContainerDriver,
    base: &Path,
    dirty: &Path,
    name: &str,
    pages: RawPages,
) -> Result<BTreeMap<&'static str, f64>, String> {
    let copy = pages != RawPages::Local;
    let ctx = OpCtx::detached();
    let a = ct_spec(&base.join("a"), name);
    let mut b = ct_spec(&base.join("b"), name);
    b.paths.volume = a.paths.volume.clone();
    let _g = CtCleanup(vec![a.clone(), b.clone()]);
    d.create(&a, &ctx).await.map_err(e("create"))?;
    install_dirty(dirty, &a.paths.volume.join("rootfs"))?;
    d.start(&a, &ctx).await.map_err(e("start"))?;
    let init_a = d.state(&a).await.map_err(e("state"))?.pid;
    let out = tempfile::tempfile().map_err(e("tempfile"))?;
    let argv = ["sh".to_string(), "-c".to_string(), dirty_cmd()];
    let rc = d
        .exec(
            &a,
            &argv,
            &BTreeMap::new(),
            out.try_clone().map_err(e("dup"))?,
            out,
        )
        .await
        .map_err(e("exec dirty"))?;
    if rc != 0 {
        return Err(format!("starting the dirtier exited with {rc}"));
    }
    wait_dirty(init_a, 30).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let images_a = base.join("a/images-dump");
    let images_b = base.join("b/images-copy");
    let mut server = None;
    let to = match pages {
        RawPages::PageServer => {
            use std::os::unix::net::UnixStream;
            std::fs::create_dir_all(&images_b).map_err(e("mkdir images"))?;
            let (src_criu, src_relay) = UnixStream::pair().map_err(e("socketpair"))?;
            let (dst_criu, dst_relay) = UnixStream::pair().map_err(e("socketpair"))?;
            let ps = d
                .page_server_on_socket(&images_b, dst_criu.into(), &ctx)
                .await
                .map_err(e("page server"))?;
            let relay = tokio::spawn(async move {
                src_relay.set_nonblocking(true)?;
                dst_relay.set_nonblocking(true)?;
                let mut s = tokio::net::UnixStream::from_std(src_relay)?;
                let mut t = tokio::net::UnixStream::from_std(dst_relay)?;
                tokio::io::copy_bidirectional(&mut s, &mut t).await
            });
            server = Some((ps, relay));
            PagesTo::Socket(src_criu.into())
        }
        _ => PagesTo::Files,
    };
    let info = d
        .migrate_dump_with(&a, &images_a, to, &ctx)
        .await
        .map_err(e("criu dump"))?;
    if let Some((ps, relay)) = server {
        ps.wait().await.map_err(e("page server"))?;
        let _ = relay.await;
    }
    let mut copied = 0;
    let from = if copy {
        copied = copy_images(&images_a, &images_b)?;
        &images_b
    } else {
        &images_a
    };
    let handover = info.frozen_at.elapsed();
    d.migrate_restore(&b, from, &ctx)
        .await
        .map_err(e("criu restore"))?;
    let downtime = info.frozen_at.elapsed();
    d.migrate_finish_source(&a, &ctx)
        .await
        .map_err(e("finish source"))?;
    let total = info.frozen_at.elapsed();
    let init_b = d.state(&b).await.map_err(e("state b"))?.pid;
    let rss = wait_dirty(init_b, 10)
        .await
        .map_err(|err| format!("after the restore: {err}"))?;
    let _ = std::fs::remove_dir_all(&images_a);
    d.stop(&b, true, &ctx).await.map_err(e("stop"))?;
    d.delete(&b).await.map_err(e("delete"))?;
    let mut s = BTreeMap::new();
    s.insert("downtime", ms(downtime));
    s.insert("total", ms(total));
    s.insert("dump", ms(info.dump_time));
    s.insert("handover", ms(handover));
    s.insert("restore", ms(downtime - handover));
    if let Some(f) = info.criu_frozen {
        s.insert("criu_frozen", ms(f));
    }
    s.insert("images_mib", info.image_bytes as f64 / MIB as f64);
    if copy {
        s.insert("copied_mib", copied as f64 / MIB as f64);
    }
    s.insert("rss_after_mib", rss as f64);
    Ok(s)
}

/// Launch `c1` on `ms[0]` via ferry with the dirtier running in it.
async fn ferry_container_setup(ms: &[Member], dirty: &Path) -> Result<(), String> {
    ferry(
        &ms[0],
        &[
            "launch",
            "busybox",
            "c1",
            "--target",
            &ms[0].name,
            "-c",
            &format!("limits.memory={CT_MEMORY}"),
        ],
        Duration::from_secs(120),
    )
    .await?;
    install_dirty(dirty, &ms[0].spec("c1", false).paths.volume.join("rootfs"))?;
    ferry(
        &ms[0],
        &["exec", "c1", "--", "sh", "-c", &dirty_cmd()],
        Duration::from_secs(30),
    )
    .await?;
    Ok(())
}

async fn init_pid(m: &Member, name: &str) -> Result<u32, String> {
    let (code, v) = m
        .raw(
            ferry_client::Method::GET,
            &format!("/1.0/instances/{name}?recursion=1"),
            None,
        )
        .await;
    if code != 200 {
        return Err(format!("GET instance {name}: {code} {v}"));
    }
    v["metadata"]["state"]["pid"]
        .as_u64()
        .map(|p| p as u32)
        .ok_or_else(|| format!("no pid for {name} on {}: {v}", m.name))
}

/// One ferry container move from `from` to `to`; figures from the operation.
async fn ferry_container_move(
    from: &Member,
    to: &Member,
    extra: &[&str],
) -> Result<BTreeMap<&'static str, f64>, String> {
    let pid = init_pid(from, "c1").await?;
    wait_dirty(pid, 30).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let meta = ferry_move(from, "c1", &to.name, extra).await?;
    let mut s = BTreeMap::new();
    s.insert(
        "downtime",
        num(&meta, &["downtime_ms"]).ok_or_else(|| format!("no downtime_ms: {meta}"))?,
    );
    s.insert(
        "total",
        num(&meta, &["total_ms"]).ok_or_else(|| format!("no total_ms: {meta}"))?,
    );
    if let Some(x) = num(&meta, &["criu_dump_ms"]) {
        s.insert("dump", x);
    }
    if let Some(x) = num(&meta, &["postcopy_serving_ms"]) {
        s.insert("serving", x);
    }
    if let Some(x) = num(&meta, &["frozen_ms_at_handover"]) {
        s.insert("handover", x);
        s.insert("restore", s["downtime"] - x);
    }
    let pid = init_pid(to, "c1").await?;
    let rss = wait_dirty(pid, 30)
        .await
        .map_err(|err| format!("after the move: {err}"))?;
    s.insert("rss_after_mib", rss as f64);
    eprintln!(
        "    path: {}\n    timeline: {}",
        meta["path"].as_str().unwrap_or("?").replace('\n', " "),
        meta["timeline"]
    );
    Ok(s)
}

// ---------------------------------------------------------------- VMs

fn vm_config() -> BTreeMap<String, String> {
    [
        ("limits.memory".to_string(), VM_MEMORY.to_string()),
        ("testvm.dirty_mib".to_string(), VM_DIRTY_MIB.to_string()),
    ]
    .into()
}

fn vm_spec(root: &Path, name: &str) -> InstanceSpec {
    let kind = (InstanceType::VirtualMachine, "testvm");
    raw_spec(root, "vol", name, kind, vm_config())
}

fn is_qemu(pid: u32) -> bool {
    let zombie = stat_fields(pid).is_some_and(|(_, st, _)| st == 'Z');
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("qemu")
}

/// Kills the QEMU a pidfile names when dropped (raw VM runs, also on failure).
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            if is_qemu(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Wait until the guest's counter (read from its RAM) advances.
async fn wait_guest(spec: &InstanceSpec, secs: u64) -> Result<(), String> {
    let vm = VmDriver::default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut first = None;
    loop {
        if let Ok(n) = vm.read_counter(spec).await {
            match first {
                None if n > 0 => first = Some(n),
                Some(f) if n > f => return Ok(()),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the guest {} does not count (first counter {first:?})",
                spec.name
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raw QEMU-to-QEMU move of a freshly booted VM, relayed over socketpairs,
/// with ferry's default parameters (no block mirror: the disk is copied first).
async fn raw_vm(
    base: &Path,
    name: &str,
    params: &MigrateParams,
) -> Result<BTreeMap<&'static str, f64>, String> {
    let d = VmDriver::default();
    let ctx = OpCtx::detached();
    let a = vm_spec(&base.join("a"), name);
    let b = vm_spec(&base.join("b"), name);
    let _ga = KillOnDrop(a.paths.run.join("qemu.pid"));
    let _gb = KillOnDrop(b.paths.run.join("qemu.pid"));
    d.create(&a, &ctx).await.map_err(e("create"))?;
    d.start(&a, &ctx).await.map_err(e("start"))?;
    wait_guest(&a, 60).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::create_dir_all(&b.paths.volume).map_err(e("mkdir"))?;
    if params.block_mirror {
        // As ferry on a dir pool: B's empty disk, filled by A's mirror.
        let size = d.disk_size(&a).map_err(e("disk size"))?;
        d.prepare_mirror_target(&b, size)
            .map_err(e("prepare mirror target"))?;
    } else {
        std::fs::copy(
            a.paths.volume.join("disk.img"),
            b.paths.volume.join("disk.img"),
        )
        .map_err(e("copy disk"))?;
    }
    let params = params.clone();
    let cfg = d.launch_config(&a).map_err(e("launch config"))?;

    let (a_stream, b_stream, relay) = raw_relay::streams(&a, &b, &params)?;
    let t0 = Instant::now();
    let mut incoming = d
        .migrate_incoming(&b, &cfg, &params, b_stream, &ctx)
        .await
        .map_err(e("migrate_incoming"))?;
    let mut mirror_ms = None;
    if params.block_mirror {
        // A's QEMU mirrors straight into B's NBD export (no relay).
        let sock = b.paths.run.join("nbd-export.sock");
        incoming
            .start_nbd_export(&sock)
            .await
            .map_err(e("NBD export"))?;
        let t = Instant::now();
        d.mirror(&a, &sock, &MirrorParams::default(), |_| {}, &ctx)
            .await
            .map_err(e("mirror"))?;
        mirror_ms = Some(ms(t.elapsed()));
    }
    let (inc, out) = tokio::join!(
        incoming.wait(&ctx),
        d.migrate_outgoing(&a, &params, a_stream, |_| {}, &ctx)
    );
    let wall = t0.elapsed();
    let out = out.map_err(e("outgoing"))?;
    let inc = inc.map_err(e("incoming"))?;
    let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
    if !inc.running {
        return Err(format!("the guest does not run on B: {inc:?}"));
    }
    wait_guest(&b, 10)
        .await
        .map_err(|err| format!("after the move: {err}"))?;
    d.migrate_finish_source(&a).await.map_err(e("finish"))?;
    d.stop(&b, true, &ctx).await.map_err(e("stop"))?;
    d.delete(&b).await.map_err(e("delete b"))?;
    d.delete(&a).await.map_err(e("delete a"))?;
    let mut s = BTreeMap::new();
    if let (Some(stop), Some(resume)) = (out.stop_event_us, inc.resume_event_us) {
        s.insert("downtime", (resume as f64 - stop as f64) / 1000.0);
    }
    s.insert("qemu_downtime", out.downtime_ms as f64);
    s.insert("qemu_total", out.total_time_ms as f64);
    if let Some(m) = mirror_ms {
        s.insert("mirror", m);
    }
    s.insert("total", ms(wall));
    s.insert("sent_mib", out.transferred as f64 / MIB as f64);
    s.insert("passes", out.dirty_sync_count as f64);
    s.insert("throttle", out.max_throttle_percent as f64);
    s.insert("limit", out.switchover_limit_ms as f64);
    if out.total_time_ms > 0 {
        s.insert(
            "throughput",
            out.transferred as f64 / MIB as f64 / (out.total_time_ms as f64 / 1000.0),
        );
    }
    Ok(s)
}

async fn ferry_vm_move(
    from: &Member,
    to: &Member,
    extra: &[&str],
) -> Result<BTreeMap<&'static str, f64>, String> {
    wait_guest(&from.spec("v1", true), 30).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let meta = ferry_move(from, "v1", &to.name, extra).await?;
    let mut s = BTreeMap::new();
    s.insert(
        "downtime",
        num(&meta, &["downtime_ms"]).ok_or_else(|| format!("no downtime_ms: {meta}"))?,
    );
    s.insert(
        "total",
        num(&meta, &["total_ms"]).ok_or_else(|| format!("no total_ms: {meta}"))?,
    );
    if let Some(x) = num(&meta, &["qemu", "downtime_ms"]) {
        s.insert("qemu_downtime", x);
    }
    if let Some(x) = num(&meta, &["disk_mirror_ms"]) {
        s.insert("mirror", x);
    }
    if let Some(x) = num(&meta, &["qemu", "passes"]) {
        s.insert("passes", x);
    }
    if let Some(x) = num(&meta, &["qemu", "max_throttle_percent"]) {
        s.insert("throttle", x);
    }
    if let Some(x) = num(&meta, &["qemu", "switchover_limit_ms"]) {
        s.insert("limit", x);
    }
    if let (Some(t), Some(b)) = (
        num(&meta, &["qemu", "total_ms"]),
        num(&meta, &["qemu", "transferred"]),
    ) {
        s.insert("qemu_total", t);
        s.insert("sent_mib", b / MIB as f64);
        if t > 0.0 {
            s.insert("throughput", b / MIB as f64 / (t / 1000.0));
        }
    }
    eprintln!(
        "    path: {}\n    timeline: {}",
        meta["path"].as_str().unwrap_or("?").replace('\n', " "),
        meta["timeline"]
    );
    wait_guest(&to.spec("v1", true), 30)
        .await
        .map_err(|err| format!("after the move: {err}"))?;
    Ok(s)
}

// ---------------------------------------------------------------- report

struct Machine {
    host: Host,
    qemu: String,
    criu: String,
    gcc: String,
}

fn machine() -> Machine {
    Machine {
        host: Host::probe(),
        qemu: bench::qemu_version(),
        criu: bench::criu_version(),
        gcc: bench::first_line(&sh("gcc", &["--version"])),
    }
}

/// "MET" / "NOT MET" / "n/a" for `lhs <= rhs`.
fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "n/a (missing figures)",
    }
}

struct Report {
    run: Run,
    machine: Machine,
    reps: usize,
    ct: Option<Vec<Series>>,
    ct_skip: Option<String>,
    vm: Option<Vec<Series>>,
    vm_skip: Option<String>,
}

/// A markdown table: one row per variant, one column per (heading,
/// metric, decimals), then successful / all runs.
fn table(s: &mut String, rows: &[Series], cols: &[(&str, &str, usize)]) {
    let head: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let _ = writeln!(s, "| variant | {} | ok / runs |", head.join(" | "));
    let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(cols.len()));
    for x in rows {
        let cells: Vec<String> = cols.iter().map(|(_, m, d)| x.cell(m, *d)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} |",
            x.label,
            cells.join(" | "),
            x.samples.len(),
            x.samples.len() + x.errors.len()
        );
    }
}

/// The failed repetitions of every variant, then a blank line.
fn failures(s: &mut String, series: &[Series]) {
    for x in series {
        for err in &x.errors {
            let _ = writeln!(s, "\nFailed, {}: `{}`", x.label, err.replace('`', "'"));
        }
    }
    let _ = writeln!(s);
}

fn find<'a>(v: &'a [Series], key: &str) -> &'a Series {
    v.iter().find(|s| s.key == key).unwrap()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn f2(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into())
}

fn f0(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

/// The goal `x ≤ k × y` (`x ≥ k × y` when `at_least`) on medians, as a list
/// item: "- TITLE: x vs k × y = k·y UNIT, RATIO = x/y — verdict".
fn scaled_goal(
    title: &str,
    x: Option<f64>,
    (k, y): (f64, Option<f64>),
    unit: &str,
    ratio_name: &str,
    at_least: bool,
) -> String {
    let met = x
        .zip(y)
        .map(|(x, y)| if at_least { x >= k * y } else { x <= k * y });
    format!(
        "- {title}: {} vs {k} × {} = {} {unit}, {ratio_name} = {} — {}",
        f0(x),
        f0(y),
        f0(y.map(|y| k * y)),
        f2(ratio(x, y)),
        verdict(met)
    )
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let (m, run) = (&r.machine, &r.run);
    let _ = writeln!(s, "{}", run.heading());
    let _ = writeln!(s, "- command: `{}`", run.command);
    let _ = writeln!(
        s,
        "- ferry: {}, `{}` build; {} repetitions of every variant; the run took {:.0} s",
        run.commit,
        run.profile,
        r.reps,
        run.took.as_secs_f64()
    );
    let _ = writeln!(s, "- machine: {}", m.host.describe());
    let _ = writeln!(s, "- {}; CRIU {}; {}", m.qemu, m.criu, m.gcc);
    let _ = writeln!(s, "{}", run.load_line());
    let _ = writeln!(
        s,
        "- figures: median (min–max) over the successful repetitions, in ms unless named otherwise\n"
    );

    if let Some(skip) = &r.ct_skip {
        let _ = writeln!(s, "**Containers: skipped** ({skip})\n");
    }
    if let Some(ct) = &r.ct {
        let _ = writeln!(
            s,
            "#### Containers: busybox + `/dirty {DIRTY_MIB} {DIRTY_INTERVAL_MS}` ({DIRTY_MIB} MiB rewritten continuously), `limits.memory={CT_MEMORY}`\n"
        );
        table(
            &mut s,
            ct,
            &[
                ("downtime (freeze → running)", "downtime", 0),
                ("total", "total", 0),
                ("CRIU dump", "dump", 0),
                ("frozen at hand-over (dump + images copied)", "handover", 0),
                ("restore (ferry: downtime − hand-over)", "restore", 0),
                ("CRIU frozen (its own stats)", "criu_frozen", 0),
                ("memory images MiB", "images_mib", 1),
            ],
        );
        let (a, b, c, d) = (find(ct, "a"), find(ct, "b"), find(ct, "c"), find(ct, "d"));
        let (da, db, dc, dd) = (
            a.median("downtime"),
            b.median("downtime"),
            c.median("downtime"),
            d.median("downtime"),
        );
        let _ = writeln!(s, "\nGoals (medians of the downtime):\n");
        let _ = writeln!(
            s,
            "- ferry live (c) ≤ raw files path (a): {} vs {} ms, (c)/(a) = {} — {}",
            f0(dc),
            f0(da),
            f2(ratio(dc, da)),
            verdict(dc.zip(da).map(|(c, a)| c <= a))
        );
        let paired = c.paired_ratios(a, "downtime");
        let _ = writeln!(s, "{}", paired_line("(c)/(a)", &paired, |r| r <= 1.0));
        let title = "stretch: ferry live (c) ≤ 1.2 × floor (b)";
        let goal = scaled_goal(title, dc, (1.2, db), "ms", "(c)/(b)", false);
        let _ = writeln!(s, "{goal}");
        let _ = writeln!(
            s,
            "- (for reference) ferry post-copy (d): {} ms, (d)/(b) = {}; it serves the rest of the memory for {} ms after resuming",
            f0(dd),
            f2(ratio(dd, db)),
            f0(d.median("serving"))
        );
        failures(&mut s, ct);
    }

    if let Some(skip) = &r.vm_skip {
        let _ = writeln!(s, "**VMs: skipped** ({skip})\n");
    }
    if let Some(vm) = &r.vm {
        let _ = writeln!(
            s,
            "#### VMs: `testvm`, `limits.memory={VM_MEMORY}`, `testvm.dirty_mib={VM_DIRTY_MIB}` (a {VM_DIRTY_MIB} MiB hot set rewritten continuously)\n"
        );
        table(
            &mut s,
            vm,
            &[
                (
                    "downtime (ferry's `downtime_ms`; raw: STOP → RESUME events)",
                    "downtime",
                    0,
                ),
                ("QEMU downtime", "qemu_downtime", 0),
                (
                    "total (ferry's `total_ms`; raw: migrate → running)",
                    "total",
                    0,
                ),
                ("QEMU total", "qemu_total", 0),
                ("disk mirror (before RAM)", "mirror", 0),
                ("RAM sent MiB", "sent_mib", 0),
                ("throughput MiB/s (RAM sent / QEMU total)", "throughput", 0),
                ("passes", "passes", 0),
                ("max throttle %", "throttle", 0),
                ("downtime-limit at switch-over", "limit", 0),
            ],
        );
        let (a, b, c, d) = (find(vm, "a"), find(vm, "b"), find(vm, "c"), find(vm, "d"));
        let (ta, tb) = (a.median("throughput"), b.median("throughput"));
        let _ = writeln!(s, "\nGoals (medians):\n");
        let title = "throughput (b) ≥ 0.9 × (a)";
        let goal = scaled_goal(title, tb, (0.9, ta), "MiB/s", "(b)/(a)", true);
        let _ = writeln!(s, "{goal}");
        let (da, db) = (a.median("downtime"), b.median("downtime"));
        let (qa, qb) = (a.median("qemu_downtime"), b.median("qemu_downtime"));
        for (title, x, y) in [
            (
                "downtime (b) ≤ 1.1 × (a), ferry's measure vs STOP → RESUME",
                db,
                da,
            ),
            ("the same with QEMU's downtime on both sides", qb, qa),
        ] {
            let goal = scaled_goal(title, x, (1.1, y), "ms", "(b)/(a)", false);
            let _ = writeln!(s, "{goal}");
        }
        let (tb, tc) = (b.median("total"), c.median("total"));
        let dc = c.median("downtime");
        let _ = writeln!(
            s,
            "- total (b) ≥ 3× shorter than (c): {} vs {} ms, (c)/(b) = {} — {}; with no worse downtime: {} vs {} ms — {}",
            f0(tb),
            f0(tc),
            f2(ratio(tc, tb)),
            verdict(tb.zip(tc).map(|(b, c)| 3.0 * b <= c)),
            f0(db),
            f0(dc),
            verdict(db.zip(dc).map(|(b, c)| b <= c))
        );
        let paired = c.paired_ratios(b, "total");
        let _ = writeln!(s, "{}", paired_line("total (c)/(b)", &paired, |r| r >= 3.0));
        let ta_total = a.median("total");
        let _ = writeln!(
            s,
            "- (for reference) the total goal against raw QEMU: 3× shorter than (c) means (b) ≤ {} ms; raw QEMU (a) took {} ms, (c)/(a) = {}",
            f0(tc.map(|c| c / 3.0)),
            f0(ta_total),
            f2(ratio(tc, ta_total)),
        );
        let dd = d.median("downtime");
        let _ = writeln!(
            s,
            "- downtime (b) ≥ 20× lower than (d): {} vs {} ms, (d)/(b) = {} — {}",
            f0(db),
            f0(dd),
            f2(ratio(dd, db)),
            verdict(db.zip(dd).map(|(b, d)| 20.0 * b <= d))
        );
        let b0 = find(vm, "b0");
        let (t0, d0, tt0) = (
            b0.median("throughput"),
            b0.median("downtime"),
            b0.median("total"),
        );
        let _ = writeln!(
            s,
            "- (for reference) without compression (b0): throughput {} MiB/s, (b0)/(a) = {}; downtime {} ms, (b0)/(a) = {}; total {} ms, (c)/(b0) = {}; (d)/(b0) = {}",
            f0(t0),
            f2(ratio(t0, ta)),
            f0(d0),
            f2(ratio(d0, da)),
            f0(tt0),
            f2(ratio(tc, tt0)),
            f2(ratio(dd, d0))
        );
        let a0 = find(vm, "a0");
        let d_a0 = a0.median("downtime");
        let _ = writeln!(
            s,
            "- (for reference) raw QEMU with its own switch-over (a0): downtime {} ms, (b)/(a0) = {}; total {} ms",
            f0(d_a0),
            f2(ratio(db, d_a0)),
            f0(a0.median("total")),
        );
        failures(&mut s, vm);
    }
    s
}

/// The doc `--write-doc` writes: one section per build profile.
const DOC: Doc = Doc {
    bench: "move-bench",
    intro: "# Benchmarks: moving running instances

Generated by `scripts/bench-move.sh` (`test/src/bin/move_bench.rs`); the
section between the markers below is rewritten by every run, the rest of this
file is kept.
",
};

// ---------------------------------------------------------------- main

fn skip_container() -> Option<String> {
    let criu = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !criu {
        return Some("criu is not installed".into());
    }
    if Command::new("gcc").arg("--version").output().is_err() {
        return Some("gcc is not installed (needed to build the dirtier)".into());
    }
    None
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // The container driver may re-exec its helper; ferryd is used here, but
    // answer the verb anyway.
    if argv.get(1).map(String::as_str) == Some("forkstart") {
        std::process::exit(forkstart_main(&argv[2..]));
    }
    let o = parse_args();
    bench::require_root("move-bench: SKIPPED: needs root (namespaces, CRIU, KVM); run scripts/bench-move.sh as root");
    std::process::exit(bench::runtime().block_on(run(o)));
}

async fn run(o: Opts) -> i32 {
    let mut run = Run::start("move-bench", o.command.clone());
    let bin = run.bin.clone();
    let machine = machine();
    eprintln!(
        "== move-bench: {} reps; binaries in {}; {} x{}, load {}",
        o.reps,
        bin.display(),
        machine.host.cpu,
        machine.host.nproc,
        run.load_before
    );

    let work = tempfile::Builder::new()
        .prefix("ferry-move-bench-")
        .tempdir()
        .expect("tempdir");
    let mut ct_skip = if o.container { skip_container() } else { None };
    let mut vm_skip = if o.vm { bench::skip_vm() } else { None };
    if !o.container {
        ct_skip = Some("not selected (--only vm)".into());
    }
    if !o.vm {
        vm_skip = Some("not selected (--only container)".into());
    }
    for (what, why) in [("containers", &ct_skip), ("VMs", &vm_skip)] {
        if let Some(w) = why {
            eprintln!("SKIP {what}: {w}");
        }
    }
    let dirty = if ct_skip.is_none() {
        match build_dirty(work.path()) {
            Ok(p) => Some(p),
            Err(err) => {
                ct_skip = Some(err);
                None
            }
        }
    } else {
        None
    };

    // The cluster: m1, m2 current; m3 speaks only migration protocol v1.
    eprintln!("== forming a cluster: m1, m2, m3 (FERRY_MIGRATION_PROTOCOL=1)");
    let ms = vec![
        Member::start("m1"),
        Member::start("m2"),
        Member::start_with_env("m3", &[("FERRY_MIGRATION_PROTOCOL", "1")]),
    ];
    ferry_test::form_cluster(&ms);

    let mut ct = None;
    if let (None, Some(dirty)) = (&ct_skip, &dirty) {
        let helper = bin.join("ferryd");
        let d = ContainerDriver::with_helper(helper);
        let mut series = vec![
            Series::new(
                "a",
                "(a) raw CRIU: dump to files, copy the images dir, restore",
            ),
            Series::new("b", "(b) raw CRIU: local dump + restore (floor)"),
            Series::new("c", "(c) ferry live move (`ferry move c1 --target m2`)"),
            Series::new("d", "(d) ferry post-copy move (`--postcopy`)"),
            Series::new(
                "e",
                "(e) raw CRIU: pages to a local page server over socketpairs + a plain relay, other images copied, restore (ferry's transport without network or TLS)",
            ),
        ];
        for rep in 0..o.reps {
            eprintln!("== containers, repetition {}/{}", rep + 1, o.reps);
            let base = work.path().join(format!("ct{rep}"));
            // (b), then (a), then (e): series index, key, how the pages go.
            for (i, key, pages) in [
                (1, "b", RawPages::Local),
                (0, "a", RawPages::CopyDir),
                (4, "e", RawPages::PageServer),
            ] {
                let name = format!("r{key}{rep}");
                let r = raw_container(&d, &base.join(key), dirty, &name, pages).await;
                series[i].record(rep, r);
            }
            match ferry_container_setup(&ms, dirty).await {
                Ok(()) => {
                    let r = ferry_container_move(&ms[0], &ms[1], &[]).await;
                    let moved = r.is_ok();
                    series[2].record(rep, r);
                    if moved {
                        let r = ferry_container_move(&ms[1], &ms[0], &["--postcopy"]).await;
                        series[3].record(rep, r);
                    } else {
                        series[3].record(rep, Err("skipped: the live move failed".into()));
                    }
                }
                Err(err) => {
                    series[2].record(rep, Err(format!("launch: {err}")));
                    series[3].record(rep, Err(format!("launch: {err}")));
                }
            }
            delete(&ms[0], "c1").await;
        }
        ct = Some(series);
    }

    let mut vm = None;
    if vm_skip.is_none() {
        let mut series = vec![
            Series::new(
                "a",
                "(a) raw QEMU → QEMU over a unix socket relay, disk mirrored straight into the target's NBD export (ferry's parameters and switch-over policy)",
            ),
            Series::new("b", "(b) ferry live move, defaults (adaptive zstd on the state stream)"),
            Series::new(
                "b0",
                "(b0) ferry live move, defaults but `--compression none` (the transport's own cost)",
            ),
            Series::new(
                "c",
                "(c) ferry live move, Incus/LXD-like `--bandwidth 128MiB --max-downtime 300 --downtime-target 300 --compression none`",
            ),
            Series::new(
                "d",
                "(d) ferry stateful-stop fallback (target speaks protocol v1)",
            ),
            Series::new("d2", "(d′) the same, back from the v1 member"),
        ];
        series.insert(
            1,
            Series::new(
                "a0",
                "(a0) raw QEMU → QEMU as (a) but with QEMU's own switch-over (`downtime-limit` 300 ms from the start, no downtime target)",
            ),
        );
        // series[0..2]: raw; series[FERRY..]: ferry's moves, in plan order.
        const FERRY: usize = 2;
        for rep in 0..o.reps {
            eprintln!("== VMs, repetition {}/{}", rep + 1, o.reps);
            let base = work.path().join(format!("vm{rep}"));
            // ferry's parameters for a dir pool's VM: its defaults plus the
            // disk mirror (ferry's (b) moves the disk the same way).
            // And multifd where ferry's (b) uses it (QEMU 8.0 or later;
            // FERRY_MULTIFD=off (or 0) in the bench's environment turns it
            // off for the members, ferryd's --migration-multifd, and for (a)).
            let multifd_on = !matches!(
                std::env::var("FERRY_MULTIFD").as_deref(),
                Ok("0" | "off" | "false")
            );
            let ferrys = MigrateParams {
                block_mirror: true,
                multifd_channels: if multifd_on && VmDriver::multifd_support().await {
                    ferry_migration::MULTIFD_CHANNELS as u8
                } else {
                    0
                },
                ..MigrateParams::default()
            };
            let r = raw_vm(&base, &format!("rv{rep}"), &ferrys).await;
            series[0].record(rep, r);
            // The same with QEMU's own switch-over (no downtime target).
            let own = MigrateParams {
                downtime_target_ms: None,
                ..ferrys.clone()
            };
            let r = raw_vm(&base, &format!("rq{rep}"), &own).await;
            series[1].record(rep, r);
            let launched = ferry(
                &ms[0],
                &[
                    "launch",
                    "testvm",
                    "v1",
                    "--vm",
                    "--target",
                    "m1",
                    "-c",
                    &format!("limits.memory={VM_MEMORY}"),
                    "-c",
                    &format!("testvm.dirty_mib={VM_DIRTY_MIB}"),
                ],
                Duration::from_secs(120),
            )
            .await;
            if let Err(err) = launched {
                for x in &mut series[FERRY..] {
                    x.record(rep, Err(format!("launch: {err}")));
                }
            } else {
                // m1 -> m2, m2 -> m1: defaults (b) and no compression (b0),
                // which one first alternating by repetition (the second
                // move's target gets the memory the first one's source QEMU
                // just freed, which this kind of host backs much faster
                // than memory it reclaimed: doc/benchmarks-moves.md);
                // m1 -> m2 (capped, Incus-like), m2 -> m3 (v1), m3 -> m1 (v1).
                const NONE: &[&str] = &["--compression", "none"];
                let (first, second) = if rep % 2 == 0 {
                    ((0, &[][..]), (1, NONE))
                } else {
                    ((1, NONE), (0, &[][..]))
                };
                let plan: [(usize, usize, usize, &[&str]); 5] = [
                    (0, 1, first.0, first.1),
                    (1, 0, second.0, second.1),
                    (
                        0,
                        1,
                        2,
                        &[
                            "--bandwidth",
                            "128MiB",
                            "--max-downtime",
                            "300",
                            "--downtime-target",
                            "300",
                            "--compression",
                            "none",
                        ],
                    ),
                    (1, 2, 3, &[]),
                    (2, 0, 4, &[]),
                ];
                let mut broken = None;
                for (from, to, i, extra) in plan {
                    if let Some(b) = &broken {
                        series[i + FERRY].record(rep, Err(format!("skipped: {b}")));
                        continue;
                    }
                    let r = ferry_vm_move(&ms[from], &ms[to], extra).await;
                    if let Err(err) = &r {
                        broken = Some(format!("an earlier move failed ({err})"));
                    }
                    series[i + FERRY].record(rep, r);
                }
            }
            delete(&ms[0], "v1").await;
        }
        vm = Some(series);
    }
    eprintln!("== tearing down");
    drop(ms);

    run.finish();
    let report = Report {
        run,
        machine,
        reps: o.reps,
        ct,
        ct_skip,
        vm,
        vm_skip,
    };
    let text = render(&report);
    DOC.publish(o.write_doc.as_deref(), &report.run.profile, &text)
}
