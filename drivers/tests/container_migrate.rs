//! Live-move primitives of the container driver, end to end on one host:
//! two "members" are two directory trees; the rootfs travels as a streamed
//! archive (full pass while running, incremental pass after the dump), the
//! memory through a real `criu page-server` on loopback (or as files), and
//! the container is restored on the other member. Needs root, criu 4.2.x,
//! busybox-static and nft; skips otherwise.
//!
//! `harness = false`: the driver re-executes this binary as
//! `container_migrate forkstart ...`, which `main` dispatches like ferryd.

mod common;
use common::{
    counter, e, ensure, ferry_cgroups, nice_of, pid_gone, proc_state, spec, Cleanup, TestFn,
    TestResult,
};
use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::container::{
    forkstart_main, ContainerDriver, LazyFrom, LazyServe, PageSink, PagesTo,
};
use ferry_drivers::storage::{
    read_archive, write_archive, ArchiveOptions, ArchiveStats, ExtractOptions, Manifest,
};
use ferry_drivers::{DriverError, InstanceSpec, Lifecycle, OpCtx};

fn is_mounted(p: &Path) -> bool {
    let Ok(p) = p.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == p)
}

/// `nft list tables` inside the network namespace of `pid`.
fn nft_tables(pid: u32) -> Result<String, String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["nft", "list", "tables"])
        .output()
        .map_err(e("nsenter nft"))?;
    ensure!(
        out.status.success(),
        "nft list tables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One rootfs pass from `src` to `dst` through a pipe, as the daemon does
/// over the filesystem channel.
fn copy_rootfs(src: &Path, dst: &Path, base: Option<Manifest>) -> Result<ArchiveStats, String> {
    let (rd, wr) = std::io::pipe().map_err(e("pipe"))?;
    let src = src.to_path_buf();
    let writer = std::thread::spawn(move || {
        let opts = ArchiveOptions {
            record_manifest: base.is_none(),
            base,
            ..Default::default()
        };
        write_archive(&src, wr, &opts)
    });
    let opts = ExtractOptions {
        allow_devices: true,
        sync: false,
        ..Default::default()
    };
    let read = read_archive(BufReader::new(rd), dst, &opts);
    let written = writer
        .join()
        .map_err(|_| "archive writer panicked".to_string())?;
    let stats = written.map_err(e("write archive"))?;
    read.map_err(e("read archive"))?;
    Ok(stats)
}

/// Copy the dump's images from the source's directory into the target's,
/// leaving alone what the page server already put there.
fn ship_images(src: &Path, dst: &Path) -> Result<(u64, usize), String> {
    std::fs::create_dir_all(dst).map_err(e("mkdir images"))?;
    let (mut bytes, mut skipped) = (0, 0);
    for ent in std::fs::read_dir(src).map_err(e("read images"))? {
        let ent = ent.map_err(e("read images"))?;
        let to = dst.join(ent.file_name());
        if to.exists() {
            skipped += 1;
            continue;
        }
        bytes += std::fs::copy(ent.path(), &to).map_err(e("copy image"))?;
    }
    Ok((bytes, skipped))
}

fn has_pages(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        })
        .unwrap_or(false)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// How the memory pages travel in a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// Files in the images dir, shipped with the metadata.
    Files,
    /// `criu page-server` on loopback TCP, the dump connects directly.
    Tcp,
    /// Unix socketpairs at both ends (`--ps-socket`), a relay task copies
    /// between them as the daemon will over its state channel.
    Relay,
    /// A unix socketpair at the dump's end only: ferry's own page sink
    /// writes the images on B (no `criu page-server`).
    Sink,
}

/// Move a running container from member A to member B.
async fn move_between_members(base: PathBuf, mode: Pages) -> TestResult {
    let d = ContainerDriver::default();
    let name = format!("mv{}-{}", mode as u8, std::process::id());
    let (a, b) = (spec(&base.join("a"), &name), spec(&base.join("b"), &name));
    let _g = Cleanup(vec![a.clone(), b.clone()]);
    let ctx = OpCtx::detached();
    d.create(&a, &ctx).await.map_err(e("create on A"))?;
    // Older than storage's "racy" window (2 s) at pass 1, as a rootfs
    // normally is: pass 2 then sends only what the container changed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    d.start(&a, &ctx).await.map_err(e("start on A"))?;
    let pid_a = d.state(&a).await.map_err(e("state"))?.pid;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Filesystem pass 1, while the container runs.
    let (root_a, root_b) = (a.paths.volume.join("rootfs"), b.paths.volume.join("rootfs"));
    std::fs::create_dir_all(&b.paths.volume).map_err(e("mkdir B volume"))?;
    let t = Instant::now();
    let pass1 = copy_rootfs(&root_a, &root_b, None)?;
    println!(
        "  rootfs pass 1: {} entries, {} bytes in {}",
        pass1.entries,
        pass1.bytes,
        ms(t.elapsed())
    );

    let images_a = base.join("a/migrate-images");
    let images_b = base.join("b/migrate-images");
    let (server, pages, relay) = match mode {
        Pages::Files => (None, PagesTo::Files, None),
        Pages::Tcp => {
            let ps = d
                .page_server(&images_b, &ctx)
                .await
                .map_err(e("page_server"))?;
            let addr = ps.addr().ok_or("TCP page server without an address")?;
            println!("  page server on {addr}");
            (Some(ps), PagesTo::PageServer(addr), None)
        }
        Pages::Relay => {
            use std::os::unix::net::UnixStream;
            let (src_criu, src_relay) = UnixStream::pair().map_err(e("socketpair"))?;
            let (dst_criu, dst_relay) = UnixStream::pair().map_err(e("socketpair"))?;
            let ps = d
                .page_server_on_socket(&images_b, dst_criu.into(), &ctx)
                .await
                .map_err(e("page_server_on_socket"))?;
            let relay = tokio::spawn(async move {
                src_relay.set_nonblocking(true)?;
                dst_relay.set_nonblocking(true)?;
                let mut s = tokio::net::UnixStream::from_std(src_relay)?;
                let mut t = tokio::net::UnixStream::from_std(dst_relay)?;
                tokio::io::copy_bidirectional(&mut s, &mut t).await
            });
            (Some(ps), PagesTo::Socket(src_criu.into()), Some(relay))
        }
        Pages::Sink => {
            use std::os::unix::net::UnixStream;
            let (src_criu, src_relay) = UnixStream::pair().map_err(e("socketpair"))?;
            std::fs::create_dir_all(&images_b).map_err(e("mkdir B images"))?;
            let dir = images_b.clone();
            let relay = tokio::spawn(async move {
                src_relay.set_nonblocking(true)?;
                let mut s = tokio::net::UnixStream::from_std(src_relay)?;
                let mut sink = PageSink::new(&dir);
                let moved = tokio::io::copy_bidirectional(&mut s, &mut sink).await?;
                let stats = sink.finish()?;
                println!("  page sink: {stats:?}");
                Ok(moved)
            });
            (None, PagesTo::Socket(src_criu.into()), Some(relay))
        }
    };

    // Freeze: the final dump.
    let before_dump = counter(&a).ok_or("no counter before the dump")?;
    let info = d
        .migrate_dump_with(&a, &images_a, pages, &ctx)
        .await
        .map_err(e("migrate_dump"))?;
    // CRIU may freeze the init while it rewrites its counter file (empty
    // until it runs again): the value read before the dump stands in.
    let on_a = counter(&a);
    let at_dump = on_a.unwrap_or(before_dump);
    ensure!(
        proc_state(pid_a) == Some('T'),
        "init on A not stopped after the dump: {:?}",
        proc_state(pid_a)
    );
    let lock = info
        .network_lock
        .clone()
        .ok_or("no network lock reported")?;
    let tables_a = nft_tables(pid_a)?;
    ensure!(
        tables_a.contains(&lock),
        "network lock {lock} not in A's netns: {tables_a:?}"
    );
    if let Some(ps) = server {
        tokio::time::timeout(Duration::from_secs(10), ps.wait())
            .await
            .map_err(|_| "page server did not exit after the dump".to_string())?
            .map_err(e("page server"))?;
        ensure!(
            has_pages(&images_b),
            "no pages arrived through the page server"
        );
        ensure!(
            !has_pages(&images_a),
            "pages written locally despite the page server"
        );
    }
    if let Some(relay) = relay {
        let (up, down) = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .map_err(|_| "relay did not end after the dump".to_string())?
            .map_err(e("relay task"))?
            .map_err(e("relay"))?;
        println!("  relayed {up} bytes to the page server, {down} back");
        ensure!(has_pages(&images_b), "no pages arrived on B");
        ensure!(!has_pages(&images_a), "pages written locally on A");
    }
    let dumped = info.frozen_at.elapsed();

    // Filesystem pass 2 (what changed since pass 1), images to B.
    let t = Instant::now();
    let pass2 = copy_rootfs(&root_a, &root_b, pass1.manifest.clone())?;
    let fs2 = t.elapsed();
    let t = Instant::now();
    let (shipped, skipped) = ship_images(&images_a, &images_b)?;
    let ship = t.elapsed();

    let t = Instant::now();
    if matches!(mode, Pages::Sink) {
        // As ferryd does with its page sink: the restore starts before the
        // pages are declared complete and waits at its gate, having read
        // none. A refused gate aborts it cleanly; an opened one restores.
        gated_restore(&d, &b, &images_b, false).await?;
        gated_restore(&d, &b, &images_b, true).await?;
    } else {
        d.migrate_restore(&b, &images_b, &ctx)
            .await
            .map_err(e("migrate_restore"))?;
    }
    let restore = t.elapsed();
    let frozen = info.frozen_at.elapsed();
    println!(
        "  dump {} (criu frozen {:?}, {} pages, {} image bytes), rootfs pass 2 {} ({} entries, {} deleted), \
         images shipped {} B in {} ({} already on B), restore {}",
        ms(info.dump_time),
        info.criu_frozen.map(ms),
        info.pages_written.unwrap_or(0),
        info.image_bytes,
        ms(fs2),
        pass2.entries,
        pass2.deleted,
        shipped,
        ms(ship),
        skipped,
        ms(restore),
    );
    println!(
        "  FROZEN (dump start -> restore done, pages {mode:?}): {} (dump done at {})",
        ms(frozen),
        ms(dumped)
    );
    ensure!(!images_b.exists(), "images dir kept after restore");
    let st_b = d.state(&b).await.map_err(e("state B"))?;
    ensure!(
        st_b.running && st_b.pid != pid_a,
        "B after restore: {st_b:?}"
    );
    let after = counter(&b).ok_or("no counter on B")?;
    ensure!(after >= at_dump, "counter reset on B: {after} < {at_dump}");
    let tables_b = nft_tables(st_b.pid)?;
    ensure!(
        !tables_b.contains("CRIU-"),
        "network lock left in B's netns: {tables_b:?}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = counter(&b).ok_or("no counter on B")?;
    println!("  counter at dump {at_dump}, right after restore {after}, 600ms later {later}");
    ensure!(later > after, "counter stuck on B: {after} -> {later}");
    ensure!(counter(&a) == on_a, "counter moved on A");
    // The console log moved with the rootfs; the restored init appends to it.
    let log_a = d.console_log(&a).await.map_err(e("console log A"))?;
    let log_b = d.console_log(&b).await.map_err(e("console log B"))?;
    ensure!(
        log_a.starts_with(b"init: ") && log_b.starts_with(&log_a),
        "console log on B {:?} does not continue A's {:?}",
        String::from_utf8_lossy(&log_b),
        String::from_utf8_lossy(&log_a)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st_b.pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(e("kill -USR1"))?;
    let mut grown = None;
    for _ in 0..100 {
        let l = d.console_log(&b).await.map_err(e("console log B"))?;
        if l.starts_with(&log_b) && String::from_utf8_lossy(&l[log_b.len()..]).contains("counter ")
        {
            grown = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = grown.ok_or("the restored init's console output did not reach B's log")?;
    println!(
        "  console log: {} bytes on A, {} on B after the move and a SIGUSR1",
        log_a.len(),
        grown.len()
    );
    ensure!(
        proc_state(pid_a) == Some('T'),
        "A's tree not stopped any more"
    );
    ensure!(
        ferry_cgroups(&name).len() >= 2,
        "expected A's and B's cgroups, found {:?}",
        ferry_cgroups(&name)
    );

    // The move succeeded: the source lets go.
    d.migrate_finish_source(&a, &ctx)
        .await
        .map_err(e("migrate_finish_source"))?;
    ensure!(pid_gone(pid_a), "A's init {pid_a} still alive");
    ensure!(
        !d.state(&a).await.map_err(e("state A"))?.running,
        "A still running"
    );
    ensure!(
        !is_mounted(&a.paths.run.join("rootfs")),
        "A's rootfs still mounted"
    );
    ensure!(
        is_mounted(&b.paths.run.join("rootfs")),
        "B's rootfs mount point not mounted"
    );
    let cgs = ferry_cgroups(&name);
    ensure!(cgs.len() == 1, "cgroups after finish: {cgs:?}");
    ensure!(
        d.state(&b).await.map_err(e("state B"))?.running,
        "B stopped by A's finish"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later2 = counter(&b).ok_or("no counter on B")?;
    ensure!(later2 > later, "B stuck after finish: {later} -> {later2}");
    d.delete(&a).await.map_err(e("delete on A"))?;
    d.stop(&b, false, &ctx).await.map_err(e("stop on B"))?;
    ensure!(ferry_cgroups(&name).is_empty(), "cgroup left after stop");
    d.delete(&b).await.map_err(e("delete on B"))?;
    Ok(())
}

/// The first line of an error (CRIU's can be long), or "" for `Ok`.
fn first_error_line<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    let text = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    text.lines().next().unwrap_or("").to_string()
}

/// A gated restore on B: wait until CRIU is held at the gate, check it
/// has read no page yet, then open (`open`) or refuse the gate.
async fn gated_restore(
    d: &ContainerDriver,
    b: &InstanceSpec,
    images: &Path,
    open: bool,
) -> TestResult {
    let ctx = OpCtx::detached();
    let log = b.paths.logs.join("restore.log");
    let _ = std::fs::remove_file(&log);
    let (opener, gate) = ferry_drivers::container::pages_gate();
    let restore = d.migrate_restore_gated(b, images, gate, &ctx);
    tokio::pin!(restore);
    let t = Instant::now();
    let held = loop {
        tokio::select! {
            r = &mut restore => return Err(format!("the gated restore ended before its gate: {:?}", r.map(|_| ()))),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("Running post-setup-namespaces scripts") {
            // Still held a moment later, and no page read.
            tokio::select! {
                r = &mut restore => return Err(format!("the restore passed a closed gate: {:?}", r.map(|_| ()))),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            break std::fs::read_to_string(&log).unwrap_or_default();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "the restore never reached its gate"
        );
    };
    ensure!(
        !held.contains("page read") && !held.contains("Restore finished"),
        "CRIU read pages before the gate opened:\n{held}"
    );
    println!("  restore held at its gate after {}", ms(t.elapsed()));
    // criu yields the CPUs to the page transfer while it waits…
    let criu = criu_restoring(&log).ok_or("no criu restore process found")?;
    let waiting = nice_of(criu).ok_or("criu's nice value")?;
    if std::env::var_os("FERRY_GATED_NICE").is_none() {
        ensure!(
            waiting == 10,
            "criu waits at its gate with nice {waiting}, not 10"
        );
    }
    if open {
        opener.open();
        restore.await.map_err(e("gated restore"))?;
        // … and neither the rest of the restore nor the container keeps that.
        let init = d.state(b).await.map_err(e("state B"))?.pid;
        ensure!(
            nice_of(init) == Some(0),
            "the restored container runs niced: {:?}",
            nice_of(init)
        );
        return Ok(());
    }
    opener.refuse();
    let r = restore.await;
    println!("  refused gate: {}", first_error_line(&r));
    ensure!(r.is_err(), "a refused gate restored the container");
    ensure!(
        !d.state(b).await.map_err(e("state B"))?.running,
        "B runs after a refused gate"
    );
    ensure!(
        images.join("inventory.img").is_file(),
        "a refused gate removed the images"
    );
    Ok(())
}

/// The `criu restore` process writing `log`.
fn criu_restoring(log: &Path) -> Option<u32> {
    let needle = log.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|d| {
        let pid: u32 = d.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(d.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (args.iter().any(|a| a == "restore") && args.contains(&needle)).then_some(pid)
    })
}

async fn move_page_server(base: PathBuf) -> TestResult {
    move_between_members(base, Pages::Tcp).await
}

async fn move_relayed(base: PathBuf) -> TestResult {
    move_between_members(base, Pages::Relay).await
}

async fn move_page_sink(base: PathBuf) -> TestResult {
    move_between_members(base, Pages::Sink).await
}

async fn move_files(base: PathBuf) -> TestResult {
    move_between_members(base, Pages::Files).await
}

/// A dump is refused during an exec session; a dump left stopped resumes
/// on the source as the same process, network unlocked.
async fn dump_then_resume(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let a = spec(&base.join("a"), &format!("rs-{}", std::process::id()));
    let _g = Cleanup(vec![a.clone()]);
    let ctx = OpCtx::detached();
    d.create(&a, &ctx).await.map_err(e("create"))?;
    d.start(&a, &ctx).await.map_err(e("start"))?;
    let pid = d.state(&a).await.map_err(e("state"))?.pid;
    let images = base.join("a/migrate-images");

    let (d2, a2) = (d.clone(), a.clone());
    let bg = tokio::spawn(async move {
        let out = tempfile::tempfile().unwrap();
        let argv = ["sleep", "2"].map(String::from);
        d2.exec(&a2, &argv, &BTreeMap::new(), out.try_clone().unwrap(), out)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = d.migrate_dump(&a, &images, None, &ctx).await;
    ensure!(
        matches!(r, Err(DriverError::WrongState(_))),
        "dump during exec not refused: {:?}",
        r.map(|_| ())
    );
    bg.await.map_err(e("join"))?.map_err(e("exec"))?;
    ensure!(proc_state(pid) != Some('T'), "stopped by a refused dump");

    // A dump that fails (no page server there) leaves it running, unlocked.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(e("port"))?;
    let r = d.migrate_dump(&a, &images, Some(nobody), &ctx).await;
    println!("  dump to a missing page server: {}", first_error_line(&r));
    ensure!(r.is_err(), "dump to a missing page server succeeded");
    let c1 = counter(&a).ok_or("no counter")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        counter(&a).is_some_and(|c2| c2 > c1) && proc_state(pid) != Some('T'),
        "not running after a failed dump"
    );
    ensure!(
        !nft_tables(pid)?.contains("CRIU-"),
        "lock table left by a failed dump"
    );

    // Pre-dumps: only where CRIU can track dirty memory. Elsewhere (this
    // project's test machine) they are refused before CRIU runs, and the
    // container is untouched; where they work, the second writes less.
    let pre = d.migrate_pre_dump(&a, &images, 1, &ctx).await;
    match ContainerDriver::pre_dump_support().await {
        Err(why) => {
            println!("  pre-dump refused (no dirty tracking here): {why}");
            ensure!(
                matches!(pre, Err(DriverError::Unsupported(_))),
                "pre-dump without dirty tracking not refused: {pre:?}"
            );
            ensure!(
                !ferry_drivers::container::pre_dump_dir(&images, 1).exists(),
                "a refused pre-dump left a directory"
            );
        }
        Ok(()) => {
            let one = pre.map_err(e("pre-dump 1"))?;
            let two = d
                .migrate_pre_dump(&a, &images, 2, &ctx)
                .await
                .map_err(e("pre-dump 2"))?;
            println!("  pre-dumps: {one:?} then {two:?}");
            ensure!(
                two.pages_written < one.pages_written,
                "the second pre-dump did not write less"
            );
        }
    }
    let c1 = counter(&a).ok_or("no counter")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        counter(&a).is_some_and(|c2| c2 > c1) && proc_state(pid) != Some('T'),
        "not running after the pre-dump attempt"
    );
    let _ = std::fs::remove_dir_all(ferry_drivers::container::pre_dump_root(&images));
    let _ = std::fs::remove_dir_all(&images);

    let before_dump = counter(&a).ok_or("no counter before the dump")?;
    let info = d
        .migrate_dump(&a, &images, None, &ctx)
        .await
        .map_err(e("migrate_dump"))?;
    ensure!(has_pages(&images), "no pages in the images dir");
    let on_a = counter(&a);
    let at_dump = on_a.unwrap_or(before_dump);
    let lock = info
        .network_lock
        .clone()
        .ok_or("no network lock reported")?;
    println!(
        "  dump {} (criu frozen {:?}), lock table {lock}",
        ms(info.dump_time),
        info.criu_frozen.map(ms)
    );
    ensure!(
        nft_tables(pid)?.contains(&lock),
        "no lock table in the netns"
    );
    let r = d.migrate_dump(&a, &images, None, &ctx).await;
    ensure!(
        matches!(r, Err(DriverError::WrongState(_))),
        "second dump of a stopped tree not refused"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(counter(&a) == on_a, "counter moved while stopped");
    ensure!(
        d.state(&a).await.map_err(e("state"))?.running,
        "stopped tree not reported as present"
    );

    let t = Instant::now();
    d.migrate_resume_source(&a, &ctx)
        .await
        .map_err(e("migrate_resume_source"))?;
    println!(
        "  resume {} (FROZEN dump start -> resumed: {}, of which 500 ms waiting in the test)",
        ms(t.elapsed()),
        ms(info.frozen_at.elapsed())
    );
    let st = d.state(&a).await.map_err(e("state"))?;
    ensure!(
        st.running && st.pid == pid,
        "not the same init: {st:?} vs {pid}"
    );
    ensure!(proc_state(pid) != Some('T'), "init still stopped");
    let tables = nft_tables(pid)?;
    ensure!(!tables.contains("CRIU-"), "lock table left: {tables:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = counter(&a).ok_or("no counter")?;
    println!("  counter at dump {at_dump}, 500ms after resume {later}");
    ensure!(later > at_dump, "counter stuck after resume");
    // Network works again inside: loopback ping through the unlocked netns.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--target={pid}"))
        .args([
            "--net",
            "--mount",
            "--root",
            "/bin/busybox",
            "ping",
            "-c1",
            "-W2",
            "127.0.0.1",
        ])
        .output()
        .map_err(e("ping"))?;
    ensure!(
        out.status.success(),
        "loopback ping in the resumed container failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And it can move again after that.
    let _ = std::fs::remove_dir_all(&images);
    d.migrate_dump(&a, &images, None, &ctx)
        .await
        .map_err(e("second migrate_dump"))?;
    d.migrate_resume_source(&a, &ctx)
        .await
        .map_err(e("second resume"))?;
    d.stop(&a, false, &ctx).await.map_err(e("stop"))?;
    d.delete(&a).await.map_err(e("delete"))?;
    Ok(())
}

/// Two members on one `shared` pool: the SAME volume path, different run
/// dirs. Each binds the volume's rootfs at its own `run/rootfs`; the source
/// letting go leaves the target's mount, cgroup and the volume alone.
async fn move_shared_volume(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let name = format!("shv-{}", std::process::id());
    let a = spec(&base.join("a"), &name);
    let mut b = spec(&base.join("b"), &name);
    b.paths.volume = a.paths.volume.clone();
    let _g = Cleanup(vec![a.clone(), b.clone()]);
    let ctx = OpCtx::detached();
    d.create(&a, &ctx).await.map_err(e("create on A"))?;
    d.start(&a, &ctx).await.map_err(e("start on A"))?;
    let pid_a = d.state(&a).await.map_err(e("state"))?.pid;
    let (mnt_a, mnt_b) = (a.paths.run.join("rootfs"), b.paths.run.join("rootfs"));
    ensure!(is_mounted(&mnt_a), "A's mount point {mnt_a:?} not mounted");
    ensure!(
        !is_mounted(&a.paths.volume.join("rootfs")),
        "the volume's rootfs itself is mounted"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;

    let images_a = base.join("a/migrate-images");
    let images_b = base.join("b/migrate-images");
    let info = d
        .migrate_dump_with(&a, &images_a, PagesTo::Files, &ctx)
        .await
        .map_err(e("migrate_dump"))?;
    // The init truncates and rewrites the file: a dump may catch it empty.
    let at_dump = counter(&a).unwrap_or(0);
    ship_images(&images_a, &images_b)?;
    d.migrate_restore(&b, &images_b, &ctx)
        .await
        .map_err(e("migrate_restore on B (same volume)"))?;
    println!(
        "  FROZEN (shared volume, pages as files): {}",
        ms(info.frozen_at.elapsed())
    );
    let st_b = d.state(&b).await.map_err(e("state B"))?;
    ensure!(st_b.running && st_b.pid != pid_a, "B: {st_b:?}");
    ensure!(
        is_mounted(&mnt_a) && is_mounted(&mnt_b),
        "both members' mount points must be mounted during the move"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = counter(&b).ok_or("no counter on B")?;
    ensure!(
        after > at_dump,
        "counter not continuing on B: {at_dump} -> {after}"
    );

    d.migrate_finish_source(&a, &ctx)
        .await
        .map_err(e("migrate_finish_source"))?;
    ensure!(pid_gone(pid_a), "A's init {pid_a} still alive");
    ensure!(!is_mounted(&mnt_a), "A's mount point still mounted");
    ensure!(is_mounted(&mnt_b), "B's root mount gone after A's finish");
    ensure!(
        a.paths.volume.join("rootfs/sbin/init").is_file(),
        "the shared volume lost its files"
    );
    let st_b = d.state(&b).await.map_err(e("state B"))?;
    ensure!(st_b.running, "B stopped by A's finish: {st_b:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = counter(&b).ok_or("no counter on B")?;
    println!("  counter at dump {at_dump}, on B {after}, after A's finish {later}");
    ensure!(
        later > after,
        "B stuck after A's finish: {after} -> {later}"
    );
    // A process inside B still sees its root.
    let out = tempfile::tempfile().map_err(e("tempfile"))?;
    let argv = ["test", "-x", "/sbin/init"].map(String::from);
    let rc = d
        .exec(&b, &argv, &BTreeMap::new(), out.try_clone().unwrap(), out)
        .await
        .map_err(e("exec in B"))?;
    ensure!(rc == 0, "B's root is not intact (test -x /sbin/init: {rc})");
    d.stop(&b, false, &ctx).await.map_err(e("stop on B"))?;
    ensure!(
        !is_mounted(&mnt_b),
        "B's mount point still mounted after stop"
    );
    ensure!(ferry_cgroups(&name).is_empty(), "cgroups left after stop");
    d.delete(&b).await.map_err(e("delete on B"))?;
    Ok(())
}

/// A relay task: bytes copied (target->source, source->target).
type Relay = tokio::task::JoinHandle<std::io::Result<(u64, u64)>>;

/// A loopback TCP relay standing in for the daemon's websocket: accepts
/// one connection (from the target's lazy-pages daemon) and pipes it to
/// `to` (the source's serving dump).
async fn tcp_relay(to: std::net::SocketAddr) -> Result<(std::net::SocketAddr, Relay), String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(e("bind relay"))?;
    let addr = l.local_addr().map_err(e("relay addr"))?;
    let h = tokio::spawn(async move {
        let (mut t, _) = l.accept().await?;
        let mut s = tokio::net::TcpStream::connect(to).await?;
        t.set_nodelay(true)?;
        s.set_nodelay(true)?;
        tokio::io::copy_bidirectional(&mut t, &mut s).await
    });
    Ok((addr, h))
}

/// Two unix socketpairs and a task copying between their inner ends: the
/// source's `--ps-socket`, the target's, and the relay.
fn socket_relay() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd, Relay), String> {
    use std::os::unix::net::UnixStream;
    let (src_criu, src_relay) = UnixStream::pair().map_err(e("socketpair"))?;
    let (dst_criu, dst_relay) = UnixStream::pair().map_err(e("socketpair"))?;
    let h = tokio::spawn(async move {
        src_relay.set_nonblocking(true)?;
        dst_relay.set_nonblocking(true)?;
        let mut s = tokio::net::UnixStream::from_std(src_relay)?;
        let mut t = tokio::net::UnixStream::from_std(dst_relay)?;
        tokio::io::copy_bidirectional(&mut t, &mut s).await
    });
    Ok((src_criu.into(), dst_criu.into(), h))
}

/// Post-copy move A -> B: lazy dump on A, images shipped, lazy-pages +
/// lazy restore on B with the page stream relayed, the container runs on
/// B before its memory arrived; A serves the rest and is removed.
async fn lazy_move(base: PathBuf, socket: bool) -> TestResult {
    let d = ContainerDriver::default();
    ContainerDriver::lazy_pages_support()
        .await
        .map_err(e("lazy_pages_support"))?;
    let name = format!("lz{}-{}", socket as u8, std::process::id());
    let (a, b) = (spec(&base.join("a"), &name), spec(&base.join("b"), &name));
    let _g = Cleanup(vec![a.clone(), b.clone()]);
    let ctx = OpCtx::detached();
    d.create(&a, &ctx).await.map_err(e("create on A"))?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    d.start(&a, &ctx).await.map_err(e("start on A"))?;
    let pid_a = d.state(&a).await.map_err(e("state"))?.pid;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (root_a, root_b) = (a.paths.volume.join("rootfs"), b.paths.volume.join("rootfs"));
    std::fs::create_dir_all(&b.paths.volume).map_err(e("mkdir B volume"))?;
    let pass1 = copy_rootfs(&root_a, &root_b, None)?;

    let images_a = base.join("a/migrate-images");
    let images_b = base.join("b/migrate-images");
    let (serve, dst_sock, sock_relay) = if socket {
        let (src, dst, h) = socket_relay()?;
        (LazyServe::Socket(src), Some(dst), Some(h))
    } else {
        (LazyServe::Tcp, None, None)
    };
    let mut dump = d
        .migrate_dump_lazy(&a, &images_a, serve, &ctx)
        .await
        .map_err(e("migrate_dump_lazy"))?;
    // The init truncates and rewrites the file: a dump may catch it empty.
    let on_a = counter(&a);
    let at_dump = on_a.unwrap_or(0);
    let ready = dump.info().frozen_at.elapsed();
    let pass2 = copy_rootfs(&root_a, &root_b, pass1.manifest.clone())?;
    let (shipped, _) = ship_images(&images_a, &images_b)?;
    let (from, tcp_relay_task) = match dst_sock {
        Some(s) => (LazyFrom::Socket(s), None),
        None => {
            let to = dump.addr().ok_or("lazy dump without a TCP address")?;
            let (relay, h) = tcp_relay(to).await?;
            println!("  dump serves on {to}, relay on {relay}");
            (LazyFrom::Tcp(relay), Some(h))
        }
    };
    let mut pages = d
        .lazy_pages(&images_b, from, &ctx)
        .await
        .map_err(e("lazy_pages"))?;
    let t = Instant::now();
    d.migrate_restore_lazy(&b, &images_b, &mut pages, &ctx)
        .await
        .map_err(e("migrate_restore_lazy"))?;
    let restore = t.elapsed();
    let frozen = dump.info().frozen_at.elapsed();
    dump.commit();
    let r = d.migrate_resume_source(&a, &ctx).await;
    ensure!(
        matches!(r, Err(DriverError::WrongState(_))),
        "resume of a committed lazy source not refused: {r:?}"
    );
    println!(
        "  lazy dump ready in {} (images {} B incl. {} B shipped, {} rootfs entries in pass 2), restore {}",
        ms(dump.info().dump_time),
        dump.info().image_bytes,
        shipped,
        pass2.entries,
        ms(restore)
    );
    println!(
        "  FROZEN freeze -> running on target (post-copy, {}): {} (images ready at {})",
        if socket {
            "unix socket relay"
        } else {
            "TCP relay"
        },
        ms(frozen),
        ms(ready)
    );
    let st_b = d.state(&b).await.map_err(e("state B"))?;
    ensure!(
        st_b.running && st_b.pid != pid_a,
        "B after restore: {st_b:?}"
    );
    let after = counter(&b).ok_or("no counter on B")?;
    ensure!(after >= at_dump, "counter reset on B: {after} < {at_dump}");

    let (served, fetched) =
        tokio::join!(d.migrate_lazy_finish_source(&a, dump, &ctx), pages.wait());
    let fetched = fetched.map_err(e("lazy-pages wait"))?;
    let served = served.map_err(e("migrate_lazy_finish_source"))?;
    println!(
        "  all pages fetched {} after lazy-pages start; source served for {}",
        ms(fetched),
        ms(served.serving),
    );
    for h in [sock_relay, tcp_relay_task].into_iter().flatten() {
        let (x, y) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .map_err(|_| "relay did not end".to_string())?
            .map_err(e("relay task"))?
            .map_err(e("relay"))?;
        println!("  relayed {x} B target->source, {y} B source->target");
    }
    ensure!(
        !images_b.exists(),
        "images dir kept after all pages arrived"
    );
    ensure!(pid_gone(pid_a), "A's init {pid_a} still alive");
    ensure!(
        !d.state(&a).await.map_err(e("state A"))?.running,
        "A running"
    );
    ensure!(
        !is_mounted(&a.paths.run.join("rootfs")),
        "A's rootfs still mounted"
    );
    ensure!(
        !a.paths.run.join("migrate-dumped").exists()
            && !a.paths.run.join("migrate-lazy-committed").exists(),
        "markers left in A's run dir"
    );
    let tables_b = nft_tables(st_b.pid)?;
    ensure!(!tables_b.contains("CRIU-"), "lock left on B: {tables_b:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = counter(&b).ok_or("no counter on B")?;
    println!("  counter at dump {at_dump}, right after restore {after}, after the finish {later}");
    ensure!(later > after, "counter stuck on B: {after} -> {later}");
    ensure!(counter(&a) == on_a, "counter moved on A");
    d.delete(&a).await.map_err(e("delete on A"))?;
    d.stop(&b, false, &ctx).await.map_err(e("stop on B"))?;
    d.delete(&b).await.map_err(e("delete on B"))?;
    ensure!(ferry_cgroups(&name).is_empty(), "cgroups left");
    Ok(())
}

async fn lazy_move_tcp_relay(base: PathBuf) -> TestResult {
    lazy_move(base, false).await
}

async fn lazy_move_socket_relay(base: PathBuf) -> TestResult {
    lazy_move(base, true).await
}

/// The target's lazy-pages daemon dies before the restore: the restore
/// fails at once and the source resumes as the same, counting process.
async fn lazy_abort_before_restore(base: PathBuf) -> TestResult {
    let d = ContainerDriver::default();
    let name = format!("lza-{}", std::process::id());
    let (a, b) = (spec(&base.join("a"), &name), spec(&base.join("b"), &name));
    let _g = Cleanup(vec![a.clone(), b.clone()]);
    let ctx = OpCtx::detached();
    d.create(&a, &ctx).await.map_err(e("create on A"))?;
    d.start(&a, &ctx).await.map_err(e("start on A"))?;
    let pid_a = d.state(&a).await.map_err(e("state"))?.pid;
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::create_dir_all(&b.paths.volume).map_err(e("mkdir B volume"))?;
    copy_rootfs(
        &a.paths.volume.join("rootfs"),
        &b.paths.volume.join("rootfs"),
        None,
    )?;
    let images_a = base.join("a/migrate-images");
    let images_b = base.join("b/migrate-images");
    let dump = d
        .migrate_dump_lazy(&a, &images_a, LazyServe::Tcp, &ctx)
        .await
        .map_err(e("migrate_dump_lazy"))?;
    // The init truncates and rewrites the file: a dump may catch it empty.
    let at_dump = counter(&a).unwrap_or(0);
    ship_images(&images_a, &images_b)?;
    let (relay, relay_task) = tcp_relay(dump.addr().ok_or("no addr")?).await?;
    let mut pages = d
        .lazy_pages(&images_b, LazyFrom::Tcp(relay), &ctx)
        .await
        .map_err(e("lazy_pages"))?;
    // It crashes (killed behind the driver's back).
    let lp = pages.pid().ok_or("no lazy-pages pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lp as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(e("kill lazy-pages"))?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let r = d
        .migrate_restore_lazy(&b, &images_b, &mut pages, &ctx)
        .await;
    println!(
        "  restore without lazy-pages: {} in {}",
        r.as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or(""),
        ms(t.elapsed())
    );
    ensure!(r.is_err(), "restore without a lazy-pages daemon succeeded");
    ensure!(pid_gone(lp), "lazy-pages {lp} still alive");
    ensure!(
        !d.state(&b).await.map_err(e("state B"))?.running,
        "B running after a failed restore"
    );
    let t = Instant::now();
    d.migrate_lazy_abort_source(&a, dump, &ctx)
        .await
        .map_err(e("migrate_lazy_abort_source"))?;
    println!("  source resumed in {}", ms(t.elapsed()));
    relay_task.abort();
    let st = d.state(&a).await.map_err(e("state A"))?;
    ensure!(st.running && st.pid == pid_a, "not the same init: {st:?}");
    ensure!(proc_state(pid_a) != Some('T'), "init still stopped");
    let tables = nft_tables(pid_a)?;
    ensure!(!tables.contains("CRIU-"), "lock table left: {tables:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = counter(&a).ok_or("no counter")?;
    println!("  counter at dump {at_dump}, 500ms after resume {later}");
    ensure!(later > at_dump, "counter stuck after resume");
    // It can move again afterwards.
    let _ = std::fs::remove_dir_all(&images_a);
    d.migrate_dump(&a, &images_a, None, &ctx)
        .await
        .map_err(e("dump after abort"))?;
    d.migrate_resume_source(&a, &ctx)
        .await
        .map_err(e("resume after second dump"))?;
    d.stop(&a, false, &ctx).await.map_err(e("stop A"))?;
    d.delete(&a).await.map_err(e("delete A"))?;
    d.delete(&b).await.map_err(e("delete B"))?;
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("forkstart") {
        std::process::exit(forkstart_main(&argv[2..]));
    }
    if !nix::unistd::Uid::effective().is_root() {
        println!("container migrate e2e: SKIPPED (needs root)\n0 passed, 0 failed");
        return;
    }
    let criu_ok = std::process::Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("Version: 4.2"))
        .unwrap_or(false);
    let nft_ok = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok();
    if !criu_ok || !nft_ok || !Path::new("/bin/busybox").exists() {
        println!("container migrate e2e: SKIPPED (needs criu 4.2.x, nft and busybox-static; run scripts/setup.sh)\n0 passed, 0 failed");
        return;
    }
    let filter = argv.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests: [(&str, TestFn); 9] = [
        ("move_page_server", |b| Box::pin(move_page_server(b))),
        ("move_relayed", |b| Box::pin(move_relayed(b))),
        ("move_page_sink", |b| Box::pin(move_page_sink(b))),
        ("dump_then_resume", |b| Box::pin(dump_then_resume(b))),
        ("move_files", |b| Box::pin(move_files(b))),
        ("move_shared_volume", |b| Box::pin(move_shared_volume(b))),
        ("lazy_move_tcp_relay", |b| Box::pin(lazy_move_tcp_relay(b))),
        ("lazy_move_socket_relay", |b| {
            Box::pin(lazy_move_socket_relay(b))
        }),
        ("lazy_abort_before_restore", |b| {
            Box::pin(lazy_abort_before_restore(b))
        }),
    ];
    common::run(&tests, filter.as_deref(), "ferry-mv-");
}
