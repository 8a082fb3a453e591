//! Failures injected for real into moves between real ferryd members: a
//! CRIU restore that fails on the target, a target pool out of space, the
//! members' TCP connections reset mid-transfer (during the first rootfs
//! pass, and while a container's memory pages cross with the target's
//! restore already waiting at its gate), and for VMs the target QEMU
//! or the target ferryd killed, the stream cut, a cancel during
//! pre-copy, or a target QEMU that cannot start. Each time the instance
//! keeps running exactly once, on the source, the record is unchanged, the
//! target holds nothing and no operation is left running. And past the point of no return (the target
//! runs the VM) a cluster database without quorum: the VM keeps running
//! once, on the target, and the move is recorded once the database is back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_client::Client;
use ferry_drivers::vm::VmDriver;
use ferry_test::{form_cluster, location, need_root, pid_alive, start_cluster, wait_for, Member};
use serde_json::{json, Value};

/// Start a move through the API; returns the client and operation id.
async fn start_move(m: &Member, name: &str, target: &str, body: Value) -> (Client, String) {
    let c = Client::unix(m.dir.join("unix.socket"));
    let env = c
        .post(
            &format!("/1.0/instances/{name}?target={target}"),
            Some(&body),
        )
        .await
        .unwrap();
    (c, env.metadata["id"].as_str().unwrap().to_string())
}

/// Wait until the operation's `phase` is `phase` (and it still runs).
async fn wait_phase(c: &Client, id: &str, phase: &str) -> Value {
    for _ in 0..600 {
        let op = c.operation(id).await.unwrap();
        if op.metadata["phase"] == phase {
            return op.metadata;
        }
        assert!(
            op.status_code < 200,
            "the move ended before phase {phase}: {op:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never saw phase {phase}");
}

/// The operation ended in failure (or cancellation); returns its error text.
async fn failed(c: &Client, id: &str, status: &str) -> String {
    let waited = tokio::time::timeout(Duration::from_secs(120), c.wait_operation(id, |_| {})).await;
    assert!(waited.is_ok(), "operation {id} did not end within 120 s");
    let op = match c.operation(id).await {
        Ok(op) => op,
        Err(e) => panic!("cannot read operation {id}: {e}"),
    };
    eprintln!("ended: {} {:?} {}", op.status, op.err, op.metadata);
    assert_eq!(op.status, status, "{op:?}");
    op.err.clone()
}

/// Nothing left: no running operation on either member.
async fn no_stuck_operation(ms: &[Member]) {
    for m in ms {
        let ops = m.client.operations().await.unwrap();
        assert!(
            ops.iter().all(|o| o.status_code >= 200),
            "an operation is stuck on {}: {ops:?}",
            m.name
        );
    }
}

/// A `criu` first in the target's PATH that runs the real CRIU but makes
/// every restore fail for real (CRIU is pointed at a root that does not exist).
fn failing_restore_criu(dir: &Path) -> PathBuf {
    let real = ["/usr/local/sbin/criu", "/usr/sbin/criu"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("criu installed");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = restore ]; then exec {} \"$@\" --root /nonexistent/ferry-test-root; fi\nexec {} \"$@\"\n",
        real.display(),
        real.display()
    );
    write_executable(&bin.join("criu"), &script);
    bin
}

/// Write a shell script and make it executable.
fn write_executable(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A tmpfs mounted over a member's default pool, unmounted on drop.
struct SmallPool(PathBuf);

impl SmallPool {
    fn mount(path: &Path, opts: &str) -> SmallPool {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(opts),
        )
        .expect("mount tmpfs");
        SmallPool(path.to_path_buf())
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// An nftables table that resets every TCP connection to or from `port`
/// (a cut link between members), removed on drop.
struct Cut(String);

impl Cut {
    fn port(port: u16) -> Cut {
        Cut::rules(
            &format!("ferry_test_cut_{port}"),
            &format!(
                "tcp dport {port} reject with tcp reset\n  tcp sport {port} reject with tcp reset"
            ),
        )
    }

    /// Only what is sent to `port`: nobody reaches that member's API, while
    /// it still reaches the others (and answers on what it dialled).
    fn to_port(port: u16) -> Cut {
        Cut::rules(
            &format!("ferry_test_cut_to_{port}"),
            &format!("tcp dport {port} reject with tcp reset"),
        )
    }

    fn rules(table: &str, rules: &str) -> Cut {
        let table = table.to_string();
        let rules = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  {rules}\n }}\n}}\n"
        );
        let st = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(rules.as_bytes())?;
                c.wait()
            })
            .expect("run nft");
        assert!(st.success(), "nft failed to add {table}");
        Cut(table)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

fn port_of(m: &Member) -> u16 {
    m.https.rsplit(':').next().unwrap().parse().unwrap()
}

/// Still on the source with the same pid, counting; location unchanged.
async fn container_undisturbed(ms: &[Member], pid: i64) {
    assert_eq!(
        ms[0].instance("c1").await["state"]["pid"].as_i64(),
        Some(pid),
        "the container is not the same process on the source"
    );
    let a = ms[0].container_counter("c1");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ms[0].container_counter("c1") > a,
        "the source stopped counting"
    );
    assert_eq!(location(&ms[0], "c1").as_deref(), Some("m1"));
    assert_eq!(location(&ms[1], "c1").as_deref(), Some("m1"));
    let vol = ms[1].spec("c1", false).paths.volume;
    wait_for(10, "the target to clean up", || {
        (!vol.exists()).then_some(())
    });
    no_stuck_operation(ms).await;
}

#[tokio::test]
async fn container_move_failures_leave_it_running_on_the_source() {
    if !need_root("container_move_failures_leave_it_running_on_the_source") {
        return;
    }
    let tools = tempfile::tempdir().unwrap();
    let bin = failing_restore_criu(tools.path());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ms = vec![
        Member::start("m1"),
        Member::start_with_env("m2", &[("PATH", &path)]),
    ];
    form_cluster(&ms);
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m1"]);
    let pid = ms[0].instance("c1").await["state"]["pid"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // 0. A migration channel with a wrong secret, even from a real member
    //    identity, is refused (403) and changes nothing.
    let op = ms[0].client.operations().await.unwrap()[0].id.clone();
    let resp = member_request(
        &ms[1],
        &ms[0],
        &format!(
            "GET /1.0/operations/{op}/websocket?secret=0123 HTTP/1.1\r\n\
             Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("invalid or already used websocket secret"),
        "{resp}"
    );
    assert_eq!(location(&ms[0], "c1").as_deref(), Some("m1"));

    // 1. CRIU restore fails on the target (after the dump: the source resumes).
    let (c, id) = start_move(&ms[0], "c1", "m2", json!({"migration": true, "live": true})).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(err.contains("restore failed"), "{err}");
    let out = ms[0].ferry(&["move", "c1", "--target", "m2"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("restore failed"),
        "the CLI does not show the error: {out:?}"
    );
    container_undisturbed(&ms, pid).await;

    // 2. The target pool is out of space mid-transfer (inodes: the free
    //    bytes the target announced were fine).
    let pool = ms[1].dir.join("storage-pools/default");
    let small = SmallPool::mount(&pool, "size=64m,nr_inodes=40");
    let (c, id) = start_move(&ms[0], "c1", "m2", json!({"migration": true, "live": true})).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(err.contains("No space left on device"), "{err}");
    container_undisturbed(&ms, pid).await;
    // The target's page sink runs out of space for the memory images
    // (the dump's pages stream into a 16 KiB tmpfs where they land).
    drop(small);
    let images = ms[1].spec("c1", false).paths.run.join("migration");
    std::fs::create_dir_all(&images).unwrap();
    let small = SmallPool::mount(&images, "size=16k");
    let (c, id) = start_move(&ms[0], "c1", "m2", json!({"migration": true, "live": true})).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(
        err.contains("page sink") && err.contains("No space left on device"),
        "{err}"
    );
    container_undisturbed(&ms, pid).await;
    // And a pool too small for the volume is refused at negotiation.
    drop(small);
    let small = SmallPool::mount(&pool, "size=512k");
    let (c, id) = start_move(&ms[0], "c1", "m2", json!({"migration": true, "live": true})).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(err.contains("bytes free but the volume needs"), "{err}");
    container_undisturbed(&ms, pid).await;
    drop(small);

    // 3. The link between the members is cut during the first pass.
    ms[0].ferry_ok(&[
        "exec",
        "c1",
        "--",
        "dd",
        "if=/dev/urandom",
        "of=/big",
        "bs=1M",
        "count=200",
    ]);
    // Capped, so that the first pass lasts seconds on any machine.
    let body = json!({"migration": true, "live": true, "bandwidth": 64u64 << 20});
    let (c, id) = start_move(&ms[0], "c1", "m2", body).await;
    wait_phase(&c, &id, "filesystem").await;
    let cut = Cut::port(port_of(&ms[0]));
    let err = failed(&c, &id, "Failure").await;
    drop(cut);
    assert!(!err.is_empty());
    container_undisturbed(&ms, pid).await;
    ms[0].ferry_ok(&["delete", "--force", "c1"]);
}

/// The link is cut while the memory pages cross: the dump is done (CRIU
/// left the tasks stopped on the source), the target's restore has started
/// and waits at its gate for the pages, and a 1 MiB/s cap keeps the ~8 MB a
/// shell holds in memory on the wire for seconds. The source resumes the
/// container; the target, once its dead-link timeout tells it, refuses the
/// gate, so CRIU aborts there before any task of the container runs.
#[tokio::test]
async fn container_link_cut_while_the_pages_cross_leaves_it_on_the_source() {
    if !need_root("container_link_cut_while_the_pages_cross_leaves_it_on_the_source") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m1"]);
    let pid = ms[0].instance("c1").await["state"]["pid"].as_i64().unwrap();
    ms[0].ferry_ok(&[
        "exec",
        "c1",
        "--",
        "sh",
        "-c",
        "sh -c 'x=$(head -c 6000000 /dev/urandom | base64); echo $$ > /held; \
         while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &",
    ]);
    let rootfs = ms[0].spec("c1", false).paths.volume.join("rootfs");
    wait_for(60, "the shell to hold its memory", || {
        rootfs.join("held").exists().then_some(())
    });
    let mark = ms[1].log().len();
    let (c, id) = start_move(
        &ms[0],
        "c1",
        "m2",
        json!({"migration": true, "live": true, "bandwidth": 1u64 << 20}),
    )
    .await;
    // What the target logged since the move started.
    let since = |m: &Member| m.log().get(mark..).unwrap_or_default().to_string();
    let gated = |m: &Member| {
        let new = since(m);
        new.contains("filesystem and images received") && !new.contains("all pages here")
    };
    wait_for(
        60,
        "a gated restore on the target with pages still on the way",
        || gated(&ms[1]).then_some(()),
    );
    let cut = Cut::port(port_of(&ms[0]));
    let err = failed(&c, &id, "Failure").await;
    drop(cut);
    assert!(!err.is_empty());
    // The target learns of the silent link by its own dead-link timeout
    // (15 s without a frame); then its gate refuses and CRIU aborts there.
    // (On a timeout the members' logs are printed as they shut down.)
    wait_for(40, "the target's gate to be refused", || {
        since(&ms[1])
            .contains("verdict given ok=false")
            .then_some(())
    });
    container_undisturbed(&ms, pid).await;
    // The shell that held the memory runs on, on the source.
    ms[0].ferry_ok(&["exec", "c1", "--", "sh", "-c", "kill -0 $(cat /held)"]);

    ms[0].ferry_ok(&["delete", "--force", "c1"]);
}

/// One raw HTTP request from `from`'s member identity (the cluster
/// certificate) to `to`'s HTTPS port; returns the response text.
async fn member_request(from: &Member, to: &Member, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = ferry_cluster::ClusterCert::load(&from.dir)
        .unwrap()
        .unwrap();
    let tls = ferry_cluster::mtls::member_client_config(&cert).unwrap();
    let tcp = tokio::net::TcpStream::connect(&to.https).await.unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ferry_cluster::mtls::cluster_server_name(), tcp)
        .await
        .unwrap();
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Launch a VM on m1 (with more config keys, if any) and wait for its
/// guest to count.
async fn vm_on_m1(ms: &[Member], memory: &str, more: &[&str]) -> i64 {
    let memory = format!("limits.memory={memory}");
    let mut args = vec![
        "launch", "testvm", "v1", "--vm", "--target", "m1", "-c", &memory,
    ];
    for kv in more {
        args.extend(["-c", kv]);
    }
    ms[0].ferry_ok(&args);
    counting_vm(&ms[0]).await
}

/// Wait until `v1`'s guest on `m` counts; returns its QEMU's pid.
async fn counting_vm(m: &Member) -> i64 {
    ferry_test::wait_guest(&m.spec("v1", true)).await;
    m.instance("v1").await["state"]["pid"].as_i64().unwrap()
}

/// The nice value of every thread of a process (field 19 of
/// /proc/<pid>/task/<tid>/stat, after the parenthesised command).
fn thread_nice_values(pid: i64) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let nice = rest.split_whitespace().nth(16).and_then(|v| v.parse().ok());
        out.push((
            t.file_name().to_string_lossy().into_owned(),
            nice.unwrap_or(i64::MIN),
        ));
    }
    out
}

async fn vm_undisturbed(ms: &[Member], pid: i64) {
    assert_eq!(
        ms[0].instance("v1").await["state"]["pid"].as_i64(),
        Some(pid),
        "the VM is not the same QEMU on the source"
    );
    // The vCPU threads yielded to the migration only while it ran: they are
    // back at the main thread's priority.
    let nice = thread_nice_values(pid);
    let main = nice
        .iter()
        .find(|(t, _)| *t == pid.to_string())
        .map(|(_, n)| *n);
    assert!(
        nice.len() > 1 && main.is_some() && nice.iter().all(|(_, n)| Some(*n) == main),
        "the source QEMU's threads kept a changed priority: {nice:?}"
    );
    assert_eq!(ms[0].instance("v1").await["status"], "Running");
    let spec = ms[0].spec("v1", true);
    let a = VmDriver::default().read_counter(&spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        VmDriver::default().read_counter(&spec).await.unwrap() > a,
        "the guest does not run on the source"
    );
    assert_eq!(location(&ms[0], "v1").as_deref(), Some("m1"));
    let t = ms[1].spec("v1", true);
    wait_for(15, "the target QEMU gone and its files removed", || {
        (!t.paths.volume.exists() && !t.paths.run.join("qemu.pid").exists()).then_some(())
    });
    no_stuck_operation(ms).await;
}

/// After a failed move: QEMU's clean-up of it normally ends within
/// milliseconds. QEMU 10.0 can leave a failed multifd migration stuck for
/// good instead (its migration thread blocked in `multifd_send_sync_main`,
/// shown on raw QEMU by scripts/experiments/multifd-unread-stall.py); the
/// guest runs on, but QEMU takes no other migration. Then ferry must refuse
/// the next move with an error that says what to do, and change nothing;
/// the VM is restarted (a new QEMU) for the next step. Returns the source
/// QEMU's pid.
async fn past_a_stuck_qemu(ms: &[Member], pid: i64) -> i64 {
    let spec = ms[0].spec("v1", true);
    for _ in 0..150 {
        if !VmDriver::default().migration_pending(&spec).await.unwrap() {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("QEMU's clean-up of the failed migration is stuck (QEMU 10.0): the next move must be refused");
    let out = ms[0].ferry(&["move", "v1", "--target", "m2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("restart the VM"),
        "a move of a VM whose QEMU is stuck in a migration: {out:?}"
    );
    vm_undisturbed(ms, pid).await;
    ms[0].ferry_ok(&["restart", "--force", "v1"]);
    let restarted = counting_vm(&ms[0]).await;
    assert_ne!(restarted, pid, "the VM was not restarted in a new QEMU");
    restarted
}

/// The QEMU processes whose command line names a file of member `m`.
fn qemus_of(m: &Member) -> Vec<i64> {
    let dir = m.dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&dir) {
            pids.push(pid);
        }
    }
    pids
}

fn target_qemu_pid(m: &Member) -> Option<i32> {
    std::fs::read_to_string(m.spec("v1", true).paths.run.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test]
async fn vm_move_failures_during_precopy_leave_it_running_on_the_source() {
    if !need_root("vm_move_failures_during_precopy_leave_it_running_on_the_source") {
        return;
    }
    precopy_failures(false).await;
}

/// The same over QEMU's multifd (three relayed connections, each its own
/// state websocket): the source member offers it even with the bandwidth
/// cap that slows the move down enough to break it.
///
/// It caught QEMU 10.0 aborting (yank.c's assertion) when ferry put back
/// the capabilities before QEMU's clean-up of the failed migration ran
/// (scripts/experiments/multifd-yank-race.py shows the race on raw QEMU).
#[tokio::test]
async fn vm_multifd_move_failures_during_precopy_leave_it_running_on_the_source() {
    if !need_root("vm_multifd_move_failures_during_precopy_leave_it_running_on_the_source") {
        return;
    }
    if !VmDriver::multifd_support().await {
        eprintln!("SKIP: this member's QEMU is older than 8.0 (no multifd)");
        return;
    }
    precopy_failures(true).await;
}

async fn precopy_failures(multifd: bool) {
    let mut ms = vec![
        Member::start_with_env(
            "m1",
            &[("FERRY_MULTIFD", if multifd { "always" } else { "0" })],
        ),
        Member::start("m2"),
    ];
    form_cluster(&ms);
    // Multifd sends the guest's zero pages as bare indexes, so it would
    // finish a quiet 256 MiB guest at once: a 128 MiB hot set keeps it busy.
    let hot: &[&str] = if multifd {
        &["testvm.dirty_mib=128"]
    } else {
        &[]
    };
    let mut pid = vm_on_m1(&ms, "256MiB", hot).await;
    // 8 MiB/s: pre-copy of 256 MiB takes half a minute, time to break it.
    let slow = json!({"migration": true, "live": true, "bandwidth": 8u64 << 20});

    // 0. A target pool too small for the disk is refused at negotiation.
    //    The target started its QEMU meanwhile (the source's request
    //    announced a live move): it goes, with the disk prepared for it.
    let small = SmallPool::mount(&ms[1].dir.join("storage-pools/default"), "size=512k");
    let (c, id) = start_move(&ms[0], "v1", "m2", slow.clone()).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(err.contains("bytes free but the volume needs"), "{err}");
    wait_for(15, "the target's early QEMU started, then gone", || {
        (ms[1].log().contains("the target QEMU started early goes") && qemus_of(&ms[1]).is_empty())
            .then_some(())
    });
    vm_undisturbed(&ms, pid).await;
    drop(small);

    // 1. Cancel during pre-copy.
    let (c, id) = start_move(&ms[0], "v1", "m2", slow.clone()).await;
    let meta = wait_phase(&c, &id, "memory").await;
    eprintln!("pre-copy: {meta}");
    let features = meta["plan"]["state"]["features"].as_array().cloned();
    assert_eq!(
        features.unwrap_or_default().iter().any(|f| f == "multifd"),
        multifd,
        "{meta}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let op = c.operation(&id).await.unwrap();
    assert!(
        op.metadata["progress"]["bytes_done"].as_u64().unwrap_or(0) > 0,
        "no memory progress: {op:?}"
    );
    c.cancel_operation(&id).await.unwrap();
    failed(&c, &id, "Cancelled").await;
    vm_undisturbed(&ms, pid).await;
    pid = past_a_stuck_qemu(&ms, pid).await;

    // 2. The target's QEMU is killed.
    let (c, id) = start_move(&ms[0], "v1", "m2", slow.clone()).await;
    wait_phase(&c, &id, "memory").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let qpid = target_qemu_pid(&ms[1]).expect("a target QEMU");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qpid), nix::sys::signal::SIGKILL).unwrap();
    let err = failed(&c, &id, "Failure").await;
    assert!(err.contains("migration"), "{err}");
    vm_undisturbed(&ms, pid).await;
    pid = past_a_stuck_qemu(&ms, pid).await;

    // 3. The link is cut (TCP resets between the members).
    let (c, id) = start_move(&ms[0], "v1", "m2", slow.clone()).await;
    wait_phase(&c, &id, "memory").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let cut = Cut::port(port_of(&ms[0]));
    failed(&c, &id, "Failure").await;
    drop(cut);
    vm_undisturbed(&ms, pid).await;
    pid = past_a_stuck_qemu(&ms, pid).await;

    // 4. The target's ferryd dies. Its QEMU may be left behind (with
    //    multifd it can wait for connections that never come): the
    //    restarted daemon's clean-up of partial receives kills it.
    let (c, id) = start_move(&ms[0], "v1", "m2", slow).await;
    wait_phase(&c, &id, "memory").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ms[1].kill_daemon();
    failed(&c, &id, "Failure").await;
    let left = target_qemu_pid(&ms[1]).filter(|q| pid_alive(*q as i64));
    ms[1].start_daemon();
    vm_undisturbed(&ms, pid).await;
    if let Some(q) = left {
        assert!(
            !pid_alive(q as i64),
            "the restarted target left its QEMU (pid {q}) running"
        );
    }
    past_a_stuck_qemu(&ms, pid).await;
    // And a move then succeeds.
    ms[0].ferry_ok(&["move", "v1", "--target", "m2"]);
    assert_eq!(ms[1].instance("v1").await["status"], "Running");
    ms[1].ferry_ok(&["delete", "--force", "v1"]);
}

/// A QEMU binary for a target member: the real one (found in PATH), except
/// that an incoming migration fails at once, as a QEMU that cannot start.
fn qemu_refusing_incoming(dir: &Path) -> PathBuf {
    let script = format!(
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = -incoming ]; then echo 'test QEMU: no incoming migration on this member' >&2; exit 1; fi\ndone\nexec {} \"$@\"\n",
        ferry_drivers::vm::qemu::QEMU_BINARY
    );
    let p = dir.join("qemu-refusing-incoming");
    write_executable(&p, &script);
    p
}

/// On a shared pool the source waits for the target's QEMU to listen before
/// it migrates. A target whose QEMU cannot start ends that wait with its
/// error: the move fails saying why, the guest never stopped on the
/// source, the shared disk stays, and nothing is left waiting.
#[tokio::test]
async fn vm_move_to_a_target_whose_qemu_cannot_start_fails_cleanly() {
    if !need_root("vm_move_to_a_target_whose_qemu_cannot_start_fails_cleanly") {
        return;
    }
    let pool = ferry_test::shared_pool_dir();
    let p = pool.path().to_str().unwrap();
    let qemu = qemu_refusing_incoming(pool.path());
    let ms = vec![
        Member::start_with_env("m1", &[("FERRY_SHARED_POOL", p)]),
        Member::start_with_env(
            "m2",
            &[
                ("FERRY_SHARED_POOL", p),
                ("FERRY_QEMU", qemu.to_str().unwrap()),
            ],
        ),
    ];
    form_cluster(&ms);
    ms[0].launch_in(
        "testvm",
        "v1",
        "m1",
        Some("shared"),
        &["limits.memory=128MiB"],
    );
    let pid = counting_vm(&ms[0]).await;
    let disk = ms[0]
        .shared_spec("v1", true, pool.path())
        .paths
        .volume
        .join("disk.img");
    assert!(disk.exists(), "the VM is not on the shared pool");
    let (c, id) = start_move(&ms[0], "v1", "m2", json!({"migration": true, "live": true})).await;
    let err = failed(&c, &id, "Failure").await;
    assert!(
        err.contains("no incoming migration on this member"),
        "the error does not say why: {err}"
    );
    // It ended in the wait: QEMU's migration never started on the source.
    let meta = c.operation(&id).await.unwrap().metadata;
    let stages: Vec<&str> = meta["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["stage"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        stages.contains(&"waiting for the target's QEMU to listen"),
        "{meta}"
    );
    assert!(
        !stages.iter().any(|s| s.starts_with("migrating memory")),
        "{meta}"
    );
    vm_undisturbed(&ms, pid).await;
    assert!(disk.exists(), "the failed move removed the shared disk");
    assert!(qemus_of(&ms[1]).is_empty(), "a QEMU is left on the target");
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
}

/// A link cut during post-copy: nothing can be rolled back (the guest's
/// memory is split between both QEMUs). The operation says the VM is lost,
/// the record stays on the source with status Error, no operation is left
/// running, the target cleans up, and the VM can be deleted.
#[tokio::test]
async fn vm_postcopy_link_cut_reports_the_vm_lost() {
    if !need_root("vm_postcopy_link_cut_reports_the_vm_lost") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    vm_on_m1(&ms, "256MiB", &[]).await;
    let body = json!({"migration": true, "live": true, "postcopy": true, "bandwidth": 4u64 << 20});
    let (c, id) = start_move(&ms[0], "v1", "m2", body).await;
    let mut in_postcopy = false;
    for _ in 0..600 {
        let op = c.operation(&id).await.unwrap();
        assert!(
            op.status_code < 200,
            "the move ended before post-copy: {op:?}"
        );
        if op.metadata["qemu_status"] == "postcopy-active" {
            in_postcopy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(in_postcopy, "never saw post-copy");
    let cut = Cut::port(port_of(&ms[0]));
    let err = failed(&c, &id, "Failure").await;
    drop(cut);
    assert!(err.contains("the VM is lost"), "{err}");
    let inst = ms[0].instance("v1").await;
    assert_eq!(inst["status"], "Error", "{inst}");
    assert_eq!(location(&ms[0], "v1").as_deref(), Some("m1"));
    no_stuck_operation(&ms).await;
    let t = ms[1].spec("v1", true);
    wait_for(15, "the target cleaned up", || {
        (!t.paths.volume.exists() && !t.paths.run.join("qemu.pid").exists()).then_some(())
    });
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
}

/// The database cannot record the new location when the target has taken
/// the VM over: nobody reaches m2's API (its raft port), so the two-member
/// cluster has no quorum from just after the memory phase began. m2 still
/// dials m1, so the move itself completes and m2 runs the guest. The source
/// must not resume its copy (that would run the VM twice): the operation
/// waits for the database and says so, and once the link is back it
/// records the move, once, and succeeds.
#[tokio::test]
async fn vm_handed_over_waits_for_the_database_and_runs_once() {
    if !need_root("vm_handed_over_waits_for_the_database_and_runs_once") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    let src_pid = vm_on_m1(&ms, "256MiB", &[]).await;
    let body = json!({"migration": true, "live": true, "bandwidth": 32u64 << 20});
    let (c, id) = start_move(&ms[0], "v1", "m2", body).await;
    wait_phase(&c, &id, "memory").await;
    let cut = Cut::to_port(port_of(&ms[1]));
    let mut waiting = None;
    for _ in 0..900 {
        let op = c.operation(&id).await.unwrap();
        assert!(
            op.status_code < 200,
            "the move ended while the database was unreachable: {op:?}"
        );
        let stage = op.metadata["stage"].as_str().unwrap_or("").to_string();
        if stage.contains("waiting for the cluster database") {
            waiting = Some(stage);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waiting = waiting.expect("the operation never said it waits for the database");
    eprintln!("while cut: {waiting}");
    // The target runs the guest; the source's QEMU is paused or already
    // gone (it quits once the target took over), never resumed.
    let on_m2 = ms[1].spec("v1", true);
    let on_m1 = ms[0].spec("v1", true);
    let vm = VmDriver::default();
    let t0 = vm.read_counter(&on_m2).await.expect("the guest runs on m2");
    let s0 = vm.read_counter(&on_m1).await.ok();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        vm.read_counter(&on_m2).await.unwrap() > t0,
        "the guest does not run on m2"
    );
    let s1 = vm.read_counter(&on_m1).await.ok();
    assert_eq!(s0, s1, "the source resumed its copy: the VM runs twice");
    // Its resources are freed without waiting for the database.
    wait_for(
        15,
        "the source QEMU gone while the database is unreachable",
        || (!ferry_test::pid_alive(src_pid)).then_some(()),
    );
    assert!(c.operation(&id).await.unwrap().status_code < 200);
    drop(cut);
    let waited =
        tokio::time::timeout(Duration::from_secs(120), c.wait_operation(&id, |_| {})).await;
    assert!(
        waited.is_ok(),
        "the move did not end once the link was back"
    );
    let op = c.operation(&id).await.unwrap();
    assert_eq!(op.status, "Success", "{op:?}");
    for m in &ms {
        assert_eq!(
            location(m, "v1").as_deref(),
            Some("m2"),
            "as {} sees it",
            m.name
        );
    }
    let list: Value = serde_json::from_str(&ms[0].ferry_ok(&["list", "--format", "json"])).unwrap();
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .filter(|i| i["name"] == "v1")
            .count(),
        1
    );
    assert_eq!(ms[1].instance("v1").await["status"], "Running");
    assert!(vm.read_counter(&on_m2).await.unwrap() > t0);
    wait_for(15, "the source QEMU gone", || {
        (!ferry_test::pid_alive(src_pid)).then_some(())
    });
    no_stuck_operation(&ms).await;
    ms[1].ferry_ok(&["delete", "--force", "v1"]);
}
