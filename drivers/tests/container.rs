//! End-to-end test of the container driver with real namespaces, cgroups and
//! CRIU. Needs root, criu 4.2.x and busybox-static; skips otherwise.
//!
//! `harness = false`: the driver re-executes this binary as
//! `container forkstart ...`, which `main` dispatches like ferryd does.

mod common;
use common::{counter, e, ensure, ferry_cgroups, pid_gone, spec, Cleanup, TestFn, TestResult};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::container::{forkstart_main, ContainerDriver};
use ferry_drivers::{DriverError, InstanceSpec, Lifecycle, OpCtx, StateSave};

async fn exec_out(
    d: &ContainerDriver,
    s: &InstanceSpec,
    argv: &[&str],
    env: &[(&str, &str)],
) -> Result<(i32, String), String> {
    let out = tempfile::tempfile().map_err(e("tempfile"))?;
    let err = tempfile::tempfile().map_err(e("tempfile"))?;
    let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let code = d
        .exec(
            s,
            &argv,
            &env,
            out.try_clone().unwrap(),
            err.try_clone().unwrap(),
        )
        .await
        .map_err(e("exec"))?;
    use std::io::{Read, Seek};
    let mut text = String::new();
    let mut out = out;
    out.rewind().unwrap();
    out.read_to_string(&mut text).unwrap();
    Ok((code, text))
}

/// The console log, as the API serves it.
async fn console(d: &ContainerDriver, s: &InstanceSpec) -> Result<String, String> {
    let log = d.console_log(s).await.map_err(e("console_log"))?;
    Ok(String::from_utf8_lossy(&log).into_owned())
}

/// The `counter N` lines of a console log.
fn counter_lines(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("counter ")?.trim().parse().ok())
        .collect()
}

/// Poll the console log until `ok` holds for it (up to `secs`).
async fn wait_console(
    d: &ContainerDriver,
    s: &InstanceSpec,
    secs: u64,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let log = console(d, s).await?;
        if ok(&log) {
            return Ok(log);
        }
        ensure!(
            Instant::now() < deadline,
            "console log: no {what} within {secs}s: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ask the init to print `counter N` now (its SIGUSR1 trap).
fn usr1(pid: u32) -> Result<(), String> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(e("kill -USR1"))
}

fn ferry_cgroup_exists(name: &str) -> bool {
    !ferry_cgroups(name).is_empty()
}

async fn lifecycle_and_criu(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let s = spec(&base, &format!("ft-{}", std::process::id()));
    let _g = Cleanup(vec![s.clone()]);
    let ctx = OpCtx::detached();
    d.validate(&s).map_err(e("validate"))?;
    let t = Instant::now();
    d.create(&s, &ctx).await.map_err(e("create"))?;
    println!("  create: {:?}", t.elapsed());
    ensure!(
        s.paths.volume.join("rootfs/sbin/init").is_file(),
        "no init in rootfs"
    );

    let t = Instant::now();
    let v = d.start(&s, &ctx).await.map_err(e("start"))?;
    println!("  start: {:?}", t.elapsed());
    ensure!(
        v.get("volatile.last_state.power") == Some(&Some("RUNNING".into())),
        "volatile {v:?}"
    );
    ensure!(d.start(&s, &ctx).await.is_err(), "second start must fail");
    let st = d.state(&s).await.map_err(e("state"))?;
    println!("  state: {st:?}");
    ensure!(
        st.running && st.pid > 1 && st.processes >= 1,
        "state {st:?}"
    );
    let cgs = ferry_cgroups(&s.name);
    ensure!(cgs.len() == 1, "expected one cgroup, found {cgs:?}");
    let limit = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| std::fs::read_to_string(cgs[0].join(f)).ok());
    ensure!(
        limit.as_deref().map(str::trim) == Some("134217728"),
        "memory limit {limit:?} in {cgs:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c1 = counter(&s).ok_or("no /counter")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c2 = counter(&s).ok_or("no /counter")?;
    println!("  counter {c1} -> {c2}");
    ensure!(c2 > c1, "counter does not advance: {c1} -> {c2}");
    // The console log: init's banner, in the rootfs.
    wait_console(&d, &s, 5, "boot banner", |l| l.contains("booting")).await?;
    ensure!(
        s.paths.volume.join("rootfs/var/log/console.log").is_file(),
        "no console log in the rootfs"
    );

    // /counter is rewritten ten times a second: a read can land between the
    // truncate and the write, so allow a few tries for a non-empty value.
    let (mut code, mut out) = exec_out(&d, &s, &["cat", "/counter"], &[]).await?;
    for _ in 0..5 {
        if code != 0 || !out.trim().is_empty() {
            break;
        }
        (code, out) = exec_out(&d, &s, &["cat", "/counter"], &[]).await?;
    }
    ensure!(
        code == 0 && out.trim().parse::<u64>().is_ok(),
        "exec cat: {code} {out:?}"
    );
    let (_, host) = exec_out(&d, &s, &["hostname"], &[]).await?;
    ensure!(host.trim() == s.name, "hostname {host:?}");
    let (_, init) = exec_out(&d, &s, &["cat", "/proc/1/cmdline"], &[]).await?;
    ensure!(init.contains("/sbin/init"), "pid 1 is {init:?}");
    let (code, out) = exec_out(
        &d,
        &s,
        &["sh", "-c", "echo $FOO; exit 3"],
        &[("FOO", "bar")],
    )
    .await?;
    ensure!(
        code == 3 && out.trim() == "bar",
        "exec env/exit: {code} {out:?}"
    );

    // A cancelled stateful stop leaves the container running.
    let cancelled = cancelled_ctx();
    let r = d.save_state(&s, &cancelled).await;
    ensure!(
        matches!(r, Err(DriverError::Cancelled(_))),
        "cancelled dump: {}",
        first_line(&r)
    );
    ensure!(
        d.state(&s).await.map_err(e("state"))?.running && !d.has_saved_state(&s),
        "cancelled dump changed state"
    );

    // Stateful stop, with a `counter N` line in the console log.
    let pid = st.pid;
    usr1(pid)?;
    let before = wait_console(&d, &s, 5, "counter line before the dump", |l| {
        !counter_lines(l).is_empty()
    })
    .await?;
    let t = Instant::now();
    let v = d.save_state(&s, &ctx).await.map_err(e("save_state"))?;
    let dump_time = t.elapsed();
    let at_dump = counter(&s).ok_or("no counter after dump")?;
    println!("  dump: {dump_time:?}, counter at dump {at_dump}");
    ensure!(
        v.get("volatile.last_state.power") == Some(&Some("STOPPED".into())),
        "volatile {v:?}"
    );
    ensure!(pid_gone(pid), "init {pid} still alive after dump");
    ensure!(d.has_saved_state(&s), "no saved state");
    ensure!(
        !d.state(&s).await.map_err(e("state"))?.running,
        "running after dump"
    );
    ensure!(!ferry_cgroup_exists(&s.name), "cgroup left after dump");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure!(counter(&s) == Some(at_dump), "counter moved while dumped");

    // A cancelled restore leaves it stopped with its state kept.
    let r = d.restore_state(&s, &cancelled).await;
    ensure!(
        matches!(r, Err(DriverError::Cancelled(_))),
        "cancelled restore: {}",
        first_line(&r)
    );
    ensure!(
        d.has_saved_state(&s) && !d.state(&s).await.map_err(e("state"))?.running,
        "cancelled restore"
    );
    ensure!(
        !ferry_cgroup_exists(&s.name),
        "cgroup left after cancelled restore"
    );

    let t = Instant::now();
    d.restore_state(&s, &ctx)
        .await
        .map_err(e("restore_state"))?;
    let restore_time = t.elapsed();
    let after = counter(&s).ok_or("no counter")?;
    println!("  restore: {restore_time:?}, counter right after restore {after}");
    ensure!(after >= at_dump, "counter went back: {after} < {at_dump}");
    ensure!(!d.has_saved_state(&s), "state not removed after restore");
    let st = d.state(&s).await.map_err(e("state"))?;
    println!("  state after restore: {st:?}");
    ensure!(st.running && st.pid != pid, "state after restore {st:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = counter(&s).ok_or("no counter")?;
    println!("  counter 600ms later {later}");
    ensure!(
        later > after && later > at_dump,
        "counter stuck after restore: {after} -> {later}"
    );
    // /counter is rewritten ten times a second: a read can land between the
    // truncate and the write, so allow a few tries for a non-empty value.
    let (mut code, mut out) = exec_out(&d, &s, &["cat", "/counter"], &[]).await?;
    for _ in 0..5 {
        if code != 0 || !out.trim().is_empty() {
            break;
        }
        (code, out) = exec_out(&d, &s, &["cat", "/counter"], &[]).await?;
    }
    ensure!(
        code == 0
            && out
                .trim()
                .parse::<u64>()
                .map(|n| n >= later)
                .unwrap_or(false),
        "exec after restore {out:?}"
    );
    // The restored init still writes to the same console log: the old
    // lines are kept and new ones appended, on demand and every 100 ticks.
    let log = console(&d, &s).await?;
    ensure!(
        log.starts_with(&before),
        "console log lost lines at the restore: {before:?} -> {log:?}"
    );
    usr1(st.pid)?;
    let log = wait_console(&d, &s, 5, "counter line after the restore", |l| {
        l.starts_with(&before)
            && counter_lines(&l[before.len()..])
                .iter()
                .any(|&n| n >= at_dump)
    })
    .await?;
    let t = Instant::now();
    let log = wait_console(&d, &s, 15, "periodic counter line after the restore", |l| {
        l.starts_with(&log)
            && counter_lines(&l[log.len()..])
                .iter()
                .any(|&n| n % 100 == 0 && n > at_dump)
    })
    .await?;
    println!(
        "  console log after restore ({} bytes, periodic line after {:?}):\n    {}",
        log.len(),
        t.elapsed(),
        log.trim_end().replace('\n', "\n    ")
    );

    // Graceful stop: the init traps TERM, so this is quick.
    let t = Instant::now();
    d.stop(&s, false, &ctx).await.map_err(e("stop"))?;
    println!("  stop: {:?}", t.elapsed());
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "TERM was not honoured"
    );
    ensure!(pid_gone(st.pid), "restored init still alive");
    ensure!(
        !d.state(&s).await.map_err(e("state"))?.running,
        "running after stop"
    );
    ensure!(!ferry_cgroup_exists(&s.name), "cgroup left after stop");
    let stopped = console(&d, &s).await?;
    ensure!(
        stopped.starts_with(&log) && stopped.contains("SIGTERM"),
        "console log of the stopped container: {stopped:?}"
    );
    d.stop(&s, false, &ctx).await.map_err(e("second stop"))?;
    d.delete(&s).await.map_err(e("delete"))?;
    ensure!(
        !s.paths.volume.exists() && !s.paths.run.exists(),
        "delete left files"
    );
    Ok(())
}

/// A dump is refused while an exec session runs (CRIU would drop it), and
/// a dump that CRIU fails (an external unix socket in the tree) leaves the
/// container running; a force stop kills at once.
async fn failed_dump_keeps_running(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let s = spec(&base, &format!("fd-{}", std::process::id()));
    let _g = Cleanup(vec![s.clone()]);
    let ctx = OpCtx::detached();
    d.create(&s, &ctx).await.map_err(e("create"))?;
    d.start(&s, &ctx).await.map_err(e("start"))?;

    let (d2, s2) = (d.clone(), s.clone());
    let bg = tokio::spawn(async move { exec_out(&d2, &s2, &["sleep", "2"], &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = d.save_state(&s, &ctx).await;
    println!("  dump during exec: {}", first_line(&r));
    ensure!(
        matches!(r, Err(DriverError::WrongState(_))),
        "dump during an exec session was not refused"
    );
    let code = bg.await.map_err(e("join"))??;
    ensure!(code.0 == 0, "exec sleep: {code:?}");

    // An orphaned background job joins init's tree, holding a socket to us.
    let (host_end, cont_end) = std::os::unix::net::UnixStream::pair().map_err(e("socketpair"))?;
    let out = std::fs::File::from(std::os::fd::OwnedFd::from(cont_end));
    let err = out.try_clone().unwrap();
    let argv = ["sh", "-c", "sleep 1000 &"].map(String::from);
    let code = d
        .exec(&s, &argv, &BTreeMap::new(), out, err)
        .await
        .map_err(e("exec bg"))?;
    ensure!(code == 0, "exec bg: {code}");
    let r = d.save_state(&s, &ctx).await;
    if let Err(err) = &r {
        println!(
            "  dump with external socket failed as expected: {}",
            err.to_string().replace('\n', "\n    ")
        );
    }
    ensure!(
        matches!(r, Err(DriverError::Command { .. })),
        "dump with an external socket did not fail in criu"
    );
    ensure!(!d.has_saved_state(&s), "failed dump left a saved state");
    let st = d.state(&s).await.map_err(e("state"))?;
    ensure!(st.running, "container not running after failed dump");
    println!("  state after failed dump: {st:?}");
    let c1 = counter(&s).ok_or("no counter")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c2 = counter(&s).ok_or("no counter")?;
    ensure!(c2 > c1, "counter frozen after failed dump: {c1} -> {c2}");
    let t = Instant::now();
    d.stop(&s, true, &ctx).await.map_err(e("force stop"))?;
    println!("  force stop: {:?}", t.elapsed());
    ensure!(pid_gone(st.pid), "init alive after force stop");
    drop(host_end);
    d.delete(&s).await.map_err(e("delete"))?;
    Ok(())
}

fn cancelled_ctx() -> OpCtx {
    let token = tokio_util::sync::CancellationToken::new();
    token.cancel();
    OpCtx::new(|_, _| {}, token)
}

fn first_line<T>(r: &Result<T, DriverError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string().lines().next().unwrap_or("").to_string(),
    }
}

/// Validation, wrong states and a cancelled start.
async fn errors_and_cancel(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let mut s = spec(&base, &format!("er-{}", std::process::id()));
    let _g = Cleanup(vec![s.clone()]);
    let ctx = OpCtx::detached();
    s.image = "alpine".into();
    ensure!(
        matches!(d.validate(&s), Err(DriverError::InvalidConfig(_))),
        "alpine accepted"
    );
    s.image = "busybox".into();
    s.config.insert("bogus.key".into(), "1".into());
    ensure!(
        matches!(d.create(&s, &ctx).await, Err(DriverError::InvalidConfig(_))),
        "bogus key accepted"
    );
    s.config.remove("bogus.key");
    d.create(&s, &ctx).await.map_err(e("create"))?;
    ensure!(
        console(&d, &s).await?.is_empty(),
        "console log before the first start"
    );
    let r = exec_out(&d, &s, &["true"], &[]).await;
    ensure!(r.is_err(), "exec in a stopped container worked");
    ensure!(
        matches!(
            d.restore_state(&s, &ctx).await,
            Err(DriverError::WrongState(_))
        ),
        "restore without state"
    );
    let cctx = cancelled_ctx();
    ensure!(
        matches!(d.start(&s, &cctx).await, Err(DriverError::Cancelled(_))),
        "cancelled start did not report it"
    );
    ensure!(
        !d.state(&s).await.map_err(e("state"))?.running,
        "cancelled start left it running"
    );
    ensure!(
        !ferry_cgroup_exists(&s.name),
        "cancelled start left a cgroup"
    );
    d.start(&s, &ctx).await.map_err(e("start"))?;
    ensure!(
        matches!(d.delete(&s).await, Err(DriverError::WrongState(_))),
        "delete of running container"
    );
    d.stop(&s, false, &ctx).await.map_err(e("stop"))?;
    d.delete(&s).await.map_err(e("delete"))?;
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("forkstart") {
        std::process::exit(forkstart_main(&argv[2..]));
    }
    if !nix::unistd::Uid::effective().is_root() {
        println!("container e2e: SKIPPED (needs root: namespaces, mounts, cgroups, CRIU)\n0 passed, 0 failed");
        return;
    }
    let criu_ok = std::process::Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Version: 4.2"))
        .unwrap_or(false);
    if !criu_ok || !Path::new("/bin/busybox").exists() {
        println!("container e2e: SKIPPED (needs criu 4.2.x and busybox-static; run scripts/setup.sh)\n0 passed, 0 failed");
        return;
    }
    let filter = argv.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests: [(&str, TestFn); 3] = [
        ("lifecycle_and_criu", |b| Box::pin(lifecycle_and_criu(b))),
        ("failed_dump_keeps_running", |b| {
            Box::pin(failed_dump_keeps_running(b))
        }),
        ("errors_and_cancel", |b| Box::pin(errors_and_cancel(b))),
    ];
    common::run(&tests, filter.as_deref(), "ferry-ct-");
}
