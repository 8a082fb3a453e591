//! `raft-bench`: commit latency (p50/p99) and throughput of replicated writes
//! on a 3-member loopback cluster of real `ferryd` daemons (not a test).
//!
//! The write is a replicated config change, `PATCH /1.0/instances/NAME` with
//! `{"config": {"user.k": "<i>"}}`, sent over a member's unix socket: the
//! member checks it, proposes one `SetInstanceConfig` raft entry and answers
//! once the entry is committed (log on a majority) and applied.
//!
//! Phases: an fsync baseline of the disk; a standalone member (same API write,
//! one local SQLite commit, no raft) as the floor; sequential writes on the
//! cluster through each path (owner is the leader / a follower, request sent
//! to the owner / to another member); throughput with N concurrent writers;
//! and, when `perf` is installed, a syscall profile (`perf trace -a`) of a few
//! spaced-out writes attributing fsyncs and connections to each member.
//!
//! Run `scripts/bench-raft.sh` (needs root); see doc/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_test::bench::{self, ms, sh, Args, Doc, Run};
use ferry_test::{cluster_members, leader_name, raw_unix, wait_for, Member};

const USAGE: &str =
    "usage: raft-bench [--writes N] [--warmup N] [--secs S] [--concurrency 1,4,16] \
[--write-doc PATH] [--no-profile] [--no-solo]

  --writes N        sequential writes per latency scenario (default 500)
  --warmup N        unmeasured writes before each scenario (default 20)
  --secs S          measured seconds per throughput level (default 4)
  --concurrency L   concurrent writers per throughput level (default 1,4,16)
  --write-doc PATH  also write the results into PATH (markdown; replaces this build
                    profile's section between its markers, keeps the rest)
  --no-profile      skip the perf-trace syscall profile
  --no-solo         skip the standalone (no raft) baseline";

struct Opts {
    writes: usize,
    warmup: usize,
    secs: f64,
    concurrency: Vec<usize>,
    write_doc: Option<PathBuf>,
    profile: bool,
    solo: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        writes: 500,
        warmup: 20,
        secs: 4.0,
        concurrency: vec![1, 4, 16],
        write_doc: None,
        profile: true,
        solo: true,
    };
    let mut args = Args::from_env("raft-bench", USAGE);
    while let Some(a) = args.next_arg() {
        match a.as_str() {
            "--writes" => o.writes = args.parsed("--writes"),
            "--warmup" => o.warmup = args.parsed("--warmup"),
            "--secs" => o.secs = args.parsed("--secs"),
            "--concurrency" => o.concurrency = args.positive_list("--concurrency", "1,4,16"),
            "--write-doc" => o.write_doc = Some(args.path("--write-doc")),
            "--no-profile" => o.profile = false,
            "--no-solo" => o.solo = false,
            "-h" | "--help" => args.help(),
            other => args.unknown(other),
        }
    }
    if o.writes == 0 || o.secs <= 0.0 {
        args.bad("--writes and --secs must be positive");
    }
    o
}

// ---------------------------------------------------------------- statistics

#[derive(Clone, Copy, Default)]
struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

/// Nearest-rank percentiles, in milliseconds.
fn stats(lat: &[Duration]) -> Stats {
    if lat.is_empty() {
        return Stats::default();
    }
    let v = bench::sorted(lat.iter().copied().map(ms).collect());
    let pct = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        n: v.len(),
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

// ---------------------------------------------------------------- client

/// One replicated config write over the member's unix socket; its latency.
async fn patch(sock: &Path, inst: &str, key: &str, val: usize) -> Result<Duration, (u16, String)> {
    let body = format!(r#"{{"config": {{"{key}": "{val}"}}}}"#);
    let path = format!("/1.0/instances/{inst}");
    let t = Instant::now();
    let (code, v) = raw_unix(sock, "PATCH", &path, Some(body.as_bytes())).await;
    let d = t.elapsed();
    if code == 200 {
        Ok(d)
    } else {
        Err((
            code,
            v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
        ))
    }
}

async fn config_value(m: &Member, inst: &str, key: &str) -> Option<String> {
    let (code, v) = raw_unix(&sock(m), "GET", &format!("/1.0/instances/{inst}"), None).await;
    (code == 200)
        .then(|| v["metadata"]["config"][key].as_str().map(str::to_string))
        .flatten()
}

fn sock(m: &Member) -> PathBuf {
    m.dir.join("unix.socket")
}

struct SeqResult {
    label: String,
    stats: Stats,
    errors: usize,
    first_error: Option<String>,
    /// CPU time (user + system) each daemon spent per measured write: (member, ms).
    cpu: Vec<(String, f64)>,
}

/// user + system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// `warmup + writes` sequential PATCHes of `inst` sent to `via`; checks the last value landed.
async fn sequential(
    label: &str,
    via: &Member,
    inst: &str,
    daemons: &[(String, u32)],
    o: &Opts,
) -> SeqResult {
    let key = "user.k";
    let mut lat = Vec::with_capacity(o.writes);
    let (mut errors, mut first_error) = (0, None);
    let mut last_ok = None;
    let t0 = Instant::now();
    let mut cpu0 = Vec::new();
    for i in 0..o.warmup + o.writes {
        if i == o.warmup {
            cpu0 = daemons.iter().map(|(_, pid)| cpu_time(*pid)).collect();
        }
        match patch(&sock(via), inst, key, i).await {
            Ok(d) => {
                last_ok = Some(i);
                if i >= o.warmup {
                    lat.push(d)
                }
            }
            Err((code, e)) => {
                errors += 1;
                first_error.get_or_insert(format!("{code}: {e}"));
            }
        }
    }
    let elapsed = t0.elapsed();
    let cpu = daemons
        .iter()
        .zip(&cpu0)
        .map(|((name, pid), c0)| {
            (
                name.clone(),
                ms(cpu_time(*pid).saturating_sub(*c0)) / o.writes as f64,
            )
        })
        .collect();
    if let Some(i) = last_ok {
        let got = config_value(via, inst, key).await;
        assert_eq!(
            got.as_deref(),
            Some(i.to_string().as_str()),
            "{label}: the last acknowledged write is not visible"
        );
    }
    let r = SeqResult {
        label: label.into(),
        stats: stats(&lat),
        errors,
        first_error,
        cpu,
    };
    let s = r.stats;
    eprintln!(
        "  {label}: p50 {:.2} ms  p99 {:.2} ms  ({} writes, {} errors, {:.1} s, daemon CPU {:.2} ms/write)",
        s.p50,
        s.p99,
        s.n,
        r.errors,
        elapsed.as_secs_f64(),
        r.cpu.iter().map(|c| c.1).sum::<f64>()
    );
    r
}

struct TputResult {
    writers: usize,
    ops_per_sec: f64,
    stats: Stats,
    ok: usize,
    conflicts: usize,
    errors: usize,
    first_error: Option<String>,
}

/// `insts.len()` concurrent writers (writer i PATCHes `insts[i]`, key `user.k<i>`)
/// for 0.5 s of warm-up plus `secs`; counts the writes completing in the measured window.
async fn throughput(via: &Member, insts: Vec<String>, secs: f64) -> TputResult {
    let n = insts.len();
    let distinct = {
        let mut d = insts.clone();
        d.sort();
        d.dedup();
        d.len()
    };
    let start = Instant::now();
    let warm = start + Duration::from_millis(500);
    let end = warm + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, inst) in insts.into_iter().enumerate() {
        let s = sock(via);
        tasks.push(tokio::spawn(async move {
            let key = format!("user.k{i}");
            let (mut lat, mut conflicts, mut errors, mut first_error) = (Vec::new(), 0, 0, None);
            let mut j = 0;
            while Instant::now() < end {
                j += 1;
                let res = patch(&s, &inst, &key, j).await;
                let done = Instant::now();
                let in_window = done >= warm && done <= end;
                match res {
                    Ok(d) if in_window => lat.push(d),
                    Ok(_) => {}
                    Err((409, _)) if in_window => conflicts += 1,
                    Err((409, _)) => {}
                    Err((code, e)) => {
                        errors += 1;
                        first_error.get_or_insert(format!("{code}: {e}"));
                    }
                }
            }
            (lat, conflicts, errors, first_error)
        }));
    }
    let (mut lat, mut conflicts, mut errors, mut first_error) = (Vec::new(), 0, 0, None);
    for t in tasks {
        let (l, c, e, f) = t.await.expect("writer task");
        lat.extend(l);
        conflicts += c;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let r = TputResult {
        writers: n,
        ops_per_sec: lat.len() as f64 / secs,
        stats: stats(&lat),
        ok: lat.len(),
        conflicts,
        errors,
        first_error,
    };
    eprintln!(
        "  {n} writer(s) on {distinct} instance(s): {:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms, {} conflicts, {} errors",
        r.ops_per_sec, r.stats.p50, r.stats.p99, r.conflicts, r.errors
    );
    r
}

// ---------------------------------------------------------------- cluster

fn form_cluster() -> Vec<Member> {
    let ms: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| Member::start(n))
        .collect();
    ms[0].ferry_ok(&["cluster", "enable", "m1"]);
    for m in &ms[1..] {
        let token = ms[0]
            .ferry_ok(&["cluster", "add", &m.name])
            .trim()
            .to_string();
        m.ferry_ok(&["cluster", "join", &token]);
    }
    for m in &ms {
        wait_for(30, "all three members online and voting", || {
            let list = cluster_members(m);
            let ok = list.len() == 3
                && list
                    .iter()
                    .all(|x| x["status"] == "Online" && x["database"] == true)
                && list
                    .iter()
                    .filter(|x| x["roles"][0] == "database-leader")
                    .count()
                    == 1;
            ok.then_some(())
        });
    }
    ms
}

fn create(via: &Member, name: &str, target: Option<&str>) {
    match target {
        Some(t) => via.ferry_ok(&["launch", "busybox", name, "--no-start", "--target", t]),
        None => via.ferry_ok(&["launch", "busybox", name, "--no-start"]),
    };
}

// ---------------------------------------------------------------- member RPC cost

/// What one member-to-member request costs: on a fresh TCP + mutual-TLS
/// connection (what ferryd does for every raft RPC and forwarded request) and
/// on a kept-alive one. `GET /1.0` to `m`'s HTTPS port with the cluster certificate.
struct RpcCost {
    fresh: Stats,
    handshake: Stats,
    reused: Stats,
    /// CPU per fresh-connection request: the server (ferryd) and the client (this process, same build profile).
    server_cpu_ms: f64,
    client_cpu_ms: f64,
}

async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let code = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other("no content-length"))?;
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(code);
        }
    }
}

async fn rpc_cost(m: &Member, n: usize) -> Option<RpcCost> {
    use tokio::io::AsyncWriteExt;
    let cert = ferry_cluster::ClusterCert::load(&m.dir).ok()??;
    let cfg = ferry_cluster::mtls::member_client_config(&cert).ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let req = b"GET /1.0 HTTP/1.1\r\nHost: ferry-cluster\r\n\r\n";
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(&m.https).await.ok()?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(ferry_cluster::mtls::cluster_server_name(), tcp)
            .await
            .ok()
    };
    // Fresh connection per request.
    let (mut fresh, mut hs) = (Vec::new(), Vec::new());
    let (s0, c0) = (cpu_time(m.pid()), cpu_time(std::process::id()));
    for _ in 0..n {
        let t = Instant::now();
        let mut tls = connect().await?;
        hs.push(t.elapsed());
        tls.write_all(req).await.ok()?;
        (read_response(&mut tls).await.ok()? == 200).then_some(())?;
        fresh.push(t.elapsed());
    }
    let (server_cpu, client_cpu) = (
        cpu_time(m.pid()).saturating_sub(s0),
        cpu_time(std::process::id()).saturating_sub(c0),
    );
    // One kept-alive connection.
    let mut tls = connect().await?;
    let mut reused = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        tls.write_all(req).await.ok()?;
        (read_response(&mut tls).await.ok()? == 200).then_some(())?;
        reused.push(t.elapsed());
    }
    Some(RpcCost {
        fresh: stats(&fresh),
        handshake: stats(&hs),
        reused: stats(&reused),
        server_cpu_ms: ms(server_cpu) / n as f64,
        client_cpu_ms: ms(client_cpu) / n as f64,
    })
}

// ---------------------------------------------------------------- machine

struct Machine {
    cpu: String,
    cpus: usize,
    mem_gib: f64,
    kernel: String,
    virt: String,
    fs: String,
    fsync_overwrite: Stats,
    fsync_append: Stats,
}

/// 4 KiB write + fsync (what an SQLite WAL commit with synchronous=FULL costs at
/// least), on the file system of the members' data dirs: overwriting a
/// preallocated file and appending to a growing one.
fn fsync_baseline(dir: &Path) -> (Stats, Stats) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let buf = vec![0x5au8; 4096];
    let p = dir.join("fsync-probe");
    let f = std::fs::File::create(&p).expect("probe file");
    f.write_all_at(&vec![0u8; 64 * 4096], 0).unwrap();
    f.sync_all().unwrap();
    let mut over = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        f.write_all_at(&buf, (i % 64) * 4096).unwrap();
        f.sync_all().unwrap();
        over.push(t.elapsed());
    }
    drop(f);
    let mut f = std::fs::File::create(&p).unwrap();
    let mut app = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
        app.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&p);
    (stats(&over), stats(&app))
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hyper = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let virt = match sh("systemd-detect-virt", &[]) {
        v if !v.is_empty() && v != "none" => format!("VM ({v})"),
        _ if hyper => "VM".to_string(),
        _ => "bare metal".to_string(),
    };
    let tmp = std::env::temp_dir();
    let fs = sh(
        "findmnt",
        &["-no", "FSTYPE,SOURCE", "-T", tmp.to_str().unwrap()],
    )
    .split_whitespace()
    .collect::<Vec<_>>()
    .join(" on ");
    let (fsync_overwrite, fsync_append) = fsync_baseline(&tmp);
    Machine {
        cpu: bench::cpu_model(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem_gib: bench::mem_gib(),
        kernel: bench::kernel(),
        virt,
        fs: format!("{} ({})", tmp.display(), fs),
        fsync_overwrite,
        fsync_append,
    }
}

// ---------------------------------------------------------------- profile

/// One syscall seen by `perf trace`.
#[derive(Debug, Clone)]
struct Sys {
    ts: f64,
    dur: f64,
    tid: i32,
    name: String,
    fd: Option<i32>,
    ret: Option<i64>,
}

fn parse_perf_trace(text: &str) -> Vec<Sys> {
    let mut out = Vec::new();
    // Entry lines interrupted by another event ("...") are completed by "[continued]" lines.
    let mut pending: BTreeMap<i32, (String, Option<i32>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((head, rest)) = line.split_once("): ") else {
            continue;
        };
        let Some((ts, dur)) = head.split_once('(') else {
            continue;
        };
        let Ok(ts) = ts.trim().parse::<f64>() else {
            continue;
        };
        let dur = dur.trim().trim_end_matches("ms").trim().parse::<f64>().ok();
        // "comm/tid syscall(...)": comm may contain '/' or spaces; the tid is digits then a space.
        let Some((tid, body)) =
            rest.char_indices()
                .filter(|(_, c)| *c == '/')
                .find_map(|(i, _)| {
                    let after = &rest[i + 1..];
                    let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
                    (!digits.is_empty() && after[digits.len()..].starts_with(' ')).then(|| {
                        (
                            digits.parse::<i32>().unwrap(),
                            after[digits.len()..].trim_start(),
                        )
                    })
                })
        else {
            continue;
        };
        let ret = body
            .rsplit_once("= ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|r| r.parse::<i64>().ok());
        if let Some(cont) = body.strip_prefix("... [continued]: ") {
            let name = cont.split('(').next().unwrap_or("").to_string();
            let fd = pending
                .remove(&tid)
                .filter(|(n, _)| *n == name)
                .and_then(|(_, fd)| fd);
            if let Some(dur) = dur {
                out.push(Sys {
                    ts,
                    dur,
                    tid,
                    name,
                    fd,
                    ret,
                });
            }
            continue;
        }
        let name = body.split('(').next().unwrap_or("").to_string();
        let fd = body
            .split_once("fd: ")
            .and_then(|(_, r)| r.split([',', ')']).next())
            .and_then(|s| s.trim().parse().ok());
        match dur {
            Some(dur) => out.push(Sys {
                ts,
                dur,
                tid,
                name,
                fd,
                ret,
            }),
            None => {
                pending.insert(tid, (name, fd));
            }
        }
    }
    out
}

fn tgid_of(tid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

struct ProfileScenario {
    label: String,
    /// event label -> (writes, median count per write, mean ms per event)
    rows: Vec<(String, f64, f64)>,
    median_latency: f64,
    timeline: Vec<String>,
    /// Critical path of a write sent to the leader: (segment, median ms, writes it was found in).
    path: Vec<(String, f64, usize)>,
}

/// Splits a leader-direct write into its steps, from the fsyncs seen in its
/// window (offsets from the client's connect): leader log append, the first
/// follower log append to finish (the quorum), leader apply.
fn critical_path(lat: f64, s: f64, evs: &[&(f64, f64, i32, String)]) -> Option<[f64; 7]> {
    let find = |pred: &dyn Fn(&str) -> bool, after: f64| {
        evs.iter()
            .find(|e| e.0 - s >= after && pred(&e.3))
            .map(|e| (e.0 - s, e.1))
    };
    let (la, la_d) = find(
        &|l| l.starts_with("leader ") && l.ends_with("fsync(raft.db-wal)"),
        0.0,
    )?;
    let (fa, fa_d) = evs
        .iter()
        .filter(|e| {
            e.3.starts_with("follower ") && e.3.ends_with("fsync(raft.db-wal)") && e.0 - s >= la
        })
        .map(|e| (e.0 - s, e.1))
        .min_by(|a, b| (a.0 + a.1).partial_cmp(&(b.0 + b.1)).unwrap())?;
    let (ap, ap_d) = find(
        &|l| l.starts_with("leader ") && l.ends_with("fsync(ferry.db-wal)"),
        fa + fa_d,
    )?;
    Some([
        la,
        la_d,
        fa - (la + la_d),
        fa_d,
        ap - (fa + fa_d),
        ap_d,
        lat - (ap + ap_d),
    ])
}

struct Profile {
    scenarios: Vec<ProfileScenario>,
    note: String,
}

struct PerfTrace {
    child: Child,
    out: PathBuf,
}

fn start_perf(out: &Path) -> Option<PerfTrace> {
    if sh("perf", &["--version"]).is_empty() {
        return None;
    }
    let child = Command::new("perf")
        .args([
            "trace",
            "-a",
            "-o",
            out.to_str().unwrap(),
            "-e",
            "fsync,fdatasync,connect,accept4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // perf trace -a needs a moment to open its events on every CPU.
    std::thread::sleep(Duration::from_millis(2000));
    Some(PerfTrace {
        child,
        out: out.to_path_buf(),
    })
}

fn stop_perf(mut p: PerfTrace) -> Option<String> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = p.child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = p.child.wait();
    std::fs::read_to_string(&p.out).ok()
}

fn plan_leader_direct(label: &str) -> bool {
    label.contains("sent to the leader")
}

/// Traced, spaced-out writes (`(label, via, inst)` each `count` times); attributes
/// each write's fsyncs and connections to members by role.
async fn profile(
    cluster: &[Member],
    leader: &str,
    plan: &[(&str, usize, &str)],
    count: usize,
) -> Option<Profile> {
    let tmp = tempfile::tempdir().ok()?;
    let perf = start_perf(&tmp.path().join("trace.txt"))?;
    eprintln!("== profile: {count} spaced-out writes per path under `perf trace -a`");
    let me = std::process::id() as i32;
    let mut lats: Vec<Vec<Duration>> = Vec::new();
    for (_, via, inst) in plan {
        let mut l = Vec::new();
        for i in 0..count {
            tokio::time::sleep(Duration::from_millis(40)).await;
            if let Ok(d) = patch(&sock(&cluster[*via]), inst, "user.p", i).await {
                l.push(d);
            } else {
                l.push(Duration::ZERO);
            }
        }
        lats.push(l);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = stop_perf(perf)?;
    let events = parse_perf_trace(&text);
    // Who is who: member pids, and the files behind their fds.
    let roles: BTreeMap<i32, String> = cluster
        .iter()
        .map(|m| {
            (
                m.pid() as i32,
                if m.name == leader {
                    format!("leader {}", m.name)
                } else {
                    format!("follower {}", m.name)
                },
            )
        })
        .collect();
    let mut tgids: BTreeMap<i32, Option<i32>> = BTreeMap::new();
    let fdpath = |pid: i32, fd: i32| -> String {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| format!("fd {fd}"))
    };
    let mut labelled: Vec<(f64, f64, i32, String)> = Vec::new(); // ts, dur, tgid, label
    for e in &events {
        let tgid = *tgids.entry(e.tid).or_insert_with(|| tgid_of(e.tid));
        let Some(tgid) = tgid else { continue };
        if tgid == me {
            if e.name == "connect" {
                labelled.push((e.ts, e.dur, tgid, "client connect".into()));
            }
            continue;
        }
        let Some(role) = roles.get(&tgid) else {
            continue;
        };
        let label = match e.name.as_str() {
            "fsync" | "fdatasync" => format!(
                "{role}: {}({})",
                e.name,
                e.fd.map(|fd| fdpath(tgid, fd)).unwrap_or_default()
            ),
            "connect" => format!("{role}: connect (new TCP+TLS peer connection)"),
            "accept4" if e.ret.is_some_and(|r| r >= 0) => format!("{role}: accept"),
            _ => continue,
        };
        labelled.push((e.ts, e.dur, tgid, label));
    }
    labelled.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let starts: Vec<f64> = labelled.iter().filter(|e| e.2 == me).map(|e| e.0).collect();
    let total: usize = lats.iter().map(Vec::len).sum();
    let note = if starts.len() == total {
        String::new()
    } else {
        format!(
            "perf saw {} client connects for {} writes: profile attribution is approximate",
            starts.len(),
            total
        )
    };
    let mut scenarios = Vec::new();
    let mut k = 0;
    for ((label, _, _), l) in plan.iter().zip(&lats) {
        let mut per_write: Vec<BTreeMap<String, (usize, f64)>> = Vec::new();
        let mut windows = Vec::new();
        for d in l {
            let Some(&s) = starts.get(k) else { break };
            k += 1;
            let end = s + ms(*d);
            let mut m: BTreeMap<String, (usize, f64)> = BTreeMap::new();
            let evs: Vec<&(f64, f64, i32, String)> = labelled
                .iter()
                .filter(|e| e.2 != me && e.0 >= s && e.0 <= end)
                .collect();
            for e in &evs {
                let x = m.entry(e.3.clone()).or_default();
                x.0 += 1;
                x.1 += e.1;
            }
            per_write.push(m);
            windows.push((ms(*d), s, evs));
        }
        if per_write.is_empty() {
            continue;
        }
        let mut keys: Vec<String> = per_write.iter().flat_map(|m| m.keys().cloned()).collect();
        keys.sort();
        keys.dedup();
        let mut rows = Vec::new();
        for key in keys {
            let mut counts: Vec<usize> = per_write
                .iter()
                .map(|m| m.get(&key).map(|x| x.0).unwrap_or(0))
                .collect();
            counts.sort();
            let median = counts[counts.len() / 2] as f64;
            let (n, sum) = per_write
                .iter()
                .filter_map(|m| m.get(&key))
                .fold((0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
            rows.push((key, median, if n > 0 { sum / n as f64 } else { 0.0 }));
        }
        // Timeline of the median-latency write.
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by(|a, b| windows[*a].0.partial_cmp(&windows[*b].0).unwrap());
        let (lat, s, evs) = &windows[order[order.len() / 2]];
        let mut timeline = vec![format!(
            "{:>7.2} ms  client connects to the unix socket, sends PATCH",
            0.0
        )];
        for e in evs {
            timeline.push(format!("{:>7.2} ms  {} ({:.2} ms)", e.0 - s, e.3, e.1));
        }
        timeline.push(format!("{:>7.2} ms  client has the response", lat));
        let mut path = Vec::new();
        if plan_leader_direct(label) {
            let parts: Vec<[f64; 7]> = windows
                .iter()
                .filter_map(|(lat, s, evs)| critical_path(*lat, *s, evs))
                .collect();
            let names = [
                "client → leader: HTTP over the unix socket, checks, raft proposal",
                "leader: log append fsync (raft.db-wal)",
                "leader → follower: start replication, new TCP + mTLS connection, request decode",
                "follower: log append fsync (raft.db-wal), the quorum's",
                "follower → leader: response, commit, save committed index, hand to the state machine",
                "leader: apply fsync (ferry.db-wal)",
                "leader → client: response",
            ];
            for (i, name) in names.iter().enumerate() {
                let mut v: Vec<f64> = parts.iter().map(|p| p[i]).collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                if !v.is_empty() {
                    path.push((name.to_string(), v[v.len() / 2], v.len()));
                }
            }
        }
        scenarios.push(ProfileScenario {
            label: label.to_string(),
            rows,
            median_latency: *lat,
            timeline,
            path,
        });
    }
    Some(Profile { scenarios, note })
}

// ---------------------------------------------------------------- report

struct Report {
    run: Run,
    machine: Machine,
    solo: Option<SeqResult>,
    seq: Vec<SeqResult>,
    tput: Vec<TputResult>,
    contention: Option<TputResult>,
    rpc: Option<RpcCost>,
    profile: Option<Profile>,
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let (m, run) = (&r.machine, &r.run);
    let _ = writeln!(s, "{}", run.heading());
    let _ = writeln!(
        s,
        "- ferry: {}; arguments: `{}`; the run took {:.0} s",
        run.commit,
        run.command,
        run.took.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "- machine: {}, {} CPUs, {:.0} GiB RAM, {}, Linux {}",
        m.cpu, m.cpus, m.mem_gib, m.virt, m.kernel
    );
    let _ = writeln!(s, "- data dirs on {}", m.fs);
    let _ = writeln!(
        s,
        "- disk: 4 KiB write + fsync p50 {:.2} ms / p99 {:.2} ms (overwrite), p50 {:.2} ms / p99 {:.2} ms (append)",
        m.fsync_overwrite.p50, m.fsync_overwrite.p99, m.fsync_append.p50, m.fsync_append.p99
    );
    let _ = writeln!(s, "{}\n", run.load_line());
    let _ = writeln!(
        s,
        "Sequential writes (one at a time), latency as the client sees it, in ms:\n"
    );
    let _ = writeln!(s, "| path | writes | p50 | p90 | p99 | max | mean | errors | daemon CPU per write (leader + followers) |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for x in r.solo.iter().chain(&r.seq) {
        let t = x.stats;
        let total: f64 = x.cpu.iter().map(|c| c.1).sum();
        let parts: Vec<String> = x.cpu.iter().map(|c| format!("{:.2}", c.1)).collect();
        let cpu = if parts.len() > 1 {
            format!("{total:.2} ({})", parts.join(" + "))
        } else {
            format!("{total:.2}")
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            x.label, t.n, t.p50, t.p90, t.p99, t.max, t.mean, x.errors, cpu
        );
    }
    for x in r.solo.iter().chain(&r.seq) {
        if let Some(e) = &x.first_error {
            let _ = writeln!(
                s,
                "\nFirst error of \"{}\": `{}`",
                x.label,
                e.replace('`', "'")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nThroughput: N concurrent writers, each PATCHing its own instance (key `user.k<i>`), sent to the leader (the owner):\n"
    );
    let _ = writeln!(
        s,
        "| writers | writes/s | p50 ms | p99 ms | max ms | writes | errors |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
    for t in &r.tput {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            t.writers, t.ops_per_sec, t.stats.p50, t.stats.p99, t.stats.max, t.ok, t.errors
        );
    }
    for t in r.tput.iter().chain(&r.contention) {
        if let Some(e) = &t.first_error {
            let _ = writeln!(
                s,
                "\nFirst error with {} writers: `{}`",
                t.writers,
                e.replace('`', "'")
            );
        }
    }
    if let Some(c) = &r.contention {
        let _ = writeln!(
            s,
            "\nSame instance: {} writers PATCHing different keys of one instance: {:.0} writes/s succeeded, {} refused with 409 \
             (\"instance is busy\": config changes of one instance hold its lease) — {:.0}% of attempts.",
            c.writers,
            c.ops_per_sec,
            c.conflicts,
            100.0 * c.conflicts as f64 / (c.conflicts + c.ok).max(1) as f64
        );
    }
    if let Some(c) = &r.rpc {
        let _ = writeln!(s, "\nOne member-to-member request (`GET /1.0` over member mTLS to the leader's HTTPS port, 200 times), in ms:\n");
        let _ = writeln!(s, "| connection | p50 | p99 | CPU per request |");
        let _ = writeln!(s, "|---|---:|---:|---|");
        let _ = writeln!(
            s,
            "| fresh TCP + mTLS handshake per request (as ferryd does) | {:.2} | {:.2} | server {:.2} + client {:.2} |",
            c.fresh.p50, c.fresh.p99, c.server_cpu_ms, c.client_cpu_ms
        );
        let _ = writeln!(
            s,
            "| of which connect + handshake | {:.2} | {:.2} | |",
            c.handshake.p50, c.handshake.p99
        );
        let _ = writeln!(
            s,
            "| kept-alive connection | {:.2} | {:.2} | |",
            c.reused.p50, c.reused.p99
        );
    }
    if let Some(p) = &r.profile {
        let _ = writeln!(
            s,
            "\nSyscall profile (`perf trace -a`, writes 40 ms apart, so member heartbeats and raft heartbeats \
             occasionally fall into a window; counts are medians per write, durations means per call):\n"
        );
        if !p.note.is_empty() {
            let _ = writeln!(s, "Note: {}\n", p.note);
        }
        for sc in &p.scenarios {
            let _ = writeln!(
                s,
                "*{}* (median latency under trace {:.2} ms):\n",
                sc.label, sc.median_latency
            );
            let _ = writeln!(s, "| event during the write | per write | ms per call |");
            let _ = writeln!(s, "|---|---:|---:|");
            for (k, c, d) in &sc.rows {
                let _ = writeln!(s, "| {} | {} | {:.2} |", k, c, d);
            }
            if !sc.path.is_empty() {
                let _ = writeln!(
                    s,
                    "\nCritical path, median of each step over the {} traced writes where all steps were seen:\n",
                    sc.path[0].2
                );
                let _ = writeln!(s, "| step | median ms |");
                let _ = writeln!(s, "|---|---:|");
                for (name, med, _) in &sc.path {
                    let _ = writeln!(s, "| {name} | {med:.2} |");
                }
            }
            let _ = writeln!(s, "\nTimeline of the median write:\n\n```");
            for l in &sc.timeline {
                let _ = writeln!(s, "{l}");
            }
            let _ = writeln!(s, "```\n");
        }
    }
    s
}

/// The doc `--write-doc` writes: one section per build profile.
const DOC: Doc = Doc {
    bench: "raft-bench",
    intro: "# Benchmarks\n",
};

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = parse_args();
    bench::require_root(
        "raft-bench: needs root (ferryd creates namespaces); run scripts/bench-raft.sh as root",
    );
    let mut run = Run::start("raft-bench", None);
    eprintln!("== machine (binaries in {})", run.bin.display());
    let machine = machine();
    eprintln!(
        "  {} x{}, fsync p50 {:.2} ms (overwrite) / {:.2} ms (append)",
        machine.cpu, machine.cpus, machine.fsync_overwrite.p50, machine.fsync_append.p50
    );

    let solo = if o.solo {
        eprintln!("== standalone member (no cluster): the same write, one local SQLite commit");
        let m = Member::start("solo");
        create(&m, "w", None);
        let r = sequential(
            "standalone member, no raft (floor)",
            &m,
            "w",
            &[("solo".into(), m.pid())],
            &o,
        )
        .await;
        drop(m);
        Some(r)
    } else {
        None
    };

    eprintln!("== forming a 3-member cluster");
    let mut ms = form_cluster();
    let leader = leader_name(&ms[0]).expect("a leader");
    let li = ms.iter().position(|m| m.name == leader).unwrap();
    let fi: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let (f1, f2) = (fi[0], fi[1]);
    eprintln!(
        "  leader {} (pid {}), followers {} (pid {}) {} (pid {})",
        leader,
        ms[li].pid(),
        ms[f1].name,
        ms[f1].pid(),
        ms[f2].name,
        ms[f2].pid()
    );
    create(&ms[li], "w", Some(&leader));
    create(&ms[li], "wf", Some(&ms[f1].name.clone()));

    eprintln!(
        "== sequential writes ({} per path after {} warm-up)",
        o.writes, o.warmup
    );
    let (ln, f1n, f2n) = (
        ms[li].name.clone(),
        ms[f1].name.clone(),
        ms[f2].name.clone(),
    );
    let plan: Vec<(String, usize, &str)> = vec![
        (format!("`w` on the leader ({ln}), sent to the leader"), li, "w"),
        (format!("`w` on the leader ({ln}), sent to follower {f2n}: API request forwarded to the owner"), f2, "w"),
        (format!("`wf` on follower {f1n}, sent to {f1n}: raft write forwarded to the leader"), f1, "wf"),
        (format!("`wf` on follower {f1n}, sent to follower {f2n}: both forwards"), f2, "wf"),
    ];
    let daemons: Vec<(String, u32)> = [li, f1, f2]
        .iter()
        .map(|i| (ms[*i].name.clone(), ms[*i].pid()))
        .collect();
    let mut seq = Vec::new();
    for (label, via, inst) in &plan {
        seq.push(sequential(label, &ms[*via], inst, &daemons, &o).await);
    }
    let now_leader = leader_name(&ms[li]);
    assert_eq!(
        now_leader.as_deref(),
        Some(leader.as_str()),
        "the leader changed during the run: the figures are not comparable"
    );

    let max_c = o.concurrency.iter().copied().max().unwrap_or(1);
    eprintln!("== throughput: creating {max_c} instances on the leader");
    let tnames: Vec<String> = (0..max_c).map(|i| format!("t{i}")).collect();
    for n in &tnames {
        create(&ms[li], n, Some(&leader));
    }
    let mut tput = Vec::new();
    for &c in &o.concurrency {
        tput.push(throughput(&ms[li], tnames[..c].to_vec(), o.secs).await);
    }
    eprintln!("== contention: 4 writers on one instance, different keys");
    let contention = Some(throughput(&ms[li], vec!["w".to_string(); 4], 2.0_f64.min(o.secs)).await);

    eprintln!("== member-to-member request cost: fresh mTLS connection vs kept-alive");
    let rpc = rpc_cost(&ms[li], 200).await;
    match &rpc {
        Some(r) => eprintln!(
            "  fresh p50 {:.2} ms (handshake {:.2} ms), reused p50 {:.2} ms; CPU per fresh request: server {:.2} ms, client {:.2} ms",
            r.fresh.p50, r.handshake.p50, r.reused.p50, r.server_cpu_ms, r.client_cpu_ms
        ),
        None => eprintln!("  (failed: could not talk to the member's HTTPS port with the cluster certificate)"),
    }

    let profile = if o.profile {
        let pplan = [
            ("`w` on the leader, sent to the leader", li, "w"),
            (
                "`wf` on a follower, sent to it (raft write forwarded)",
                f1,
                "wf",
            ),
        ];
        let p = profile(&ms, &leader, &pplan, 40).await;
        if p.is_none() {
            eprintln!("  (no profile: `perf trace` is not available)");
        }
        p
    } else {
        None
    };

    // Tear down: the follower owning `wf` first, while the others keep a quorum.
    eprintln!("== tearing down");
    let owner_of_wf = ms.remove(f1);
    drop(owner_of_wf);
    drop(ms);

    run.finish();
    let report = Report {
        run,
        machine,
        solo,
        seq,
        tput,
        contention,
        rpc,
        profile,
    };
    let text = render(&report);
    let code = DOC.publish(o.write_doc.as_deref(), &report.run.profile, &text);
    if code != 0 {
        std::process::exit(code);
    }
}
