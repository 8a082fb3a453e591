//! Harness for ferry's end-to-end tests.
//!
//! [`Member`] starts a real `ferryd` (the binary built next to the test
//! executable, in `target/debug`) with its own data dir under a temp dir, on
//! its own unix socket and a free loopback HTTPS port. Dropping it — also when
//! a test panics — force-deletes the instances it still has, stops the
//! daemon, kills any leftover instance processes by the pids in its run dir,
//! unmounts what is mounted under its data dir and removes the temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_client::{Client, Method};
use serde_json::{json, Value};

/// Directory holding the workspace's binaries (`ferryd`, `ferry`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug; a bin (target/debug/<bin>) -> target/debug
    let parent = exe.parent().expect("target dir");
    let dir = if parent.ends_with("deps") {
        parent.parent().expect("target dir")
    } else {
        parent
    }
    .to_path_buf();
    for b in ["ferryd", "ferry"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: run `cargo build --workspace` first",
            dir.join(b).display()
        );
    }
    dir
}

/// Start members with these names and form a cluster of them (see
/// [`form_cluster`]).
pub fn start_cluster(names: &[&str]) -> Vec<Member> {
    let ms: Vec<Member> = names.iter().map(|n| Member::start(n)).collect();
    form_cluster(&ms);
    ms
}

/// Form a cluster of the given members: the first enables clustering, the
/// others join with tokens; waits until all are online voters.
pub fn form_cluster(ms: &[Member]) {
    ms[0].ferry_ok(&["cluster", "enable", &ms[0].name]);
    for m in &ms[1..] {
        let token = ms[0]
            .ferry_ok(&["cluster", "add", &m.name])
            .trim()
            .to_string();
        m.ferry_ok(&["cluster", "join", &token]);
    }
    for m in ms {
        wait_for(20, "all members online and voting", || {
            let list = cluster_members(m);
            let ok = list.len() == ms.len()
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
}

/// `ferry cluster list --format json` on `m`.
pub fn cluster_members(m: &Member) -> Vec<Value> {
    let out = m.ferry_ok(&["cluster", "list", "--format", "json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Name of the current raft leader as `m` sees it.
pub fn leader_name(m: &Member) -> Option<String> {
    cluster_members(m)
        .into_iter()
        .find(|x| x["roles"][0] == "database-leader")
        .and_then(|x| x["server_name"].as_str().map(str::to_string))
}

/// A temp dir to serve as the shared pool of some members
/// (`FERRY_SHARED_POOL`); removed on drop.
pub fn shared_pool_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-shared-")
        .tempdir()
        .expect("a temp dir for the shared pool")
}

/// Wait (up to 30 s) until the test guest's counter, read from its RAM
/// over QMP, is readable and above 0.
pub async fn wait_guest(spec: &ferry_drivers::InstanceSpec) {
    for _ in 0..300 {
        let n = ferry_drivers::vm::VmDriver::default()
            .read_counter(spec)
            .await;
        if n.is_ok_and(|n| n > 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the guest {} never started counting", spec.name);
}

/// True when running as root (the e2e tests need it); prints why a test is skipped.
pub fn need_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIP {test}: needs root (namespaces, CRIU, KVM)");
    false
}

/// A port on 127.0.0.1 that nobody listens on now, chosen below the kernel's
/// ephemeral range (`ip_local_port_range`), so an outgoing connection of some
/// other process cannot take it between this check and ferryd's bind (a CI
/// run lost a member to exactly that). Each call in a process gets a new one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // 20000..32000, below the default 32768
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (seed + n * 13) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
}

pub struct Member {
    pub name: String,
    pub dir: PathBuf,
    pub https: String,
    tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    env: Vec<(String, String)>,
    pub client: Client,
}

impl Member {
    pub fn start(name: &str) -> Member {
        Member::start_with_env(name, &[])
    }

    /// Start with extra environment for ferryd (e.g. `FERRY_QEMU`).
    pub fn start_with_env(name: &str, env: &[(&str, &str)]) -> Member {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-e2e-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().join("ferry");
        let port = free_port();
        let mut m = Member {
            name: name.into(),
            client: Client::unix(dir.join("unix.socket")),
            dir,
            https: format!("127.0.0.1:{port}"),
            tmp: Some(tmp),
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // The port may still be taken between the check and ferryd's bind:
        // only on the first start, choose another one.
        for _ in 0..5 {
            match m.try_spawn() {
                Ok(()) => return m,
                Err(log) if log.contains("Address already in use") => {
                    let _ = std::fs::remove_file(m.tmp.as_ref().unwrap().path().join("ferryd.log"));
                    m.https = format!("127.0.0.1:{}", free_port());
                }
                Err(log) => panic!("ferryd exited early:\n{log}"),
            }
        }
        panic!("ferryd could not bind a port after 5 tries:\n{}", m.log());
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("ferryd exited early:\n{log}");
        }
    }

    /// Start ferryd and wait for its unix socket; `Err(log)` if it exited.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.as_ref().unwrap().path().join("ferryd.log"))
            .unwrap();
        let child = Command::new(bin_dir().join("ferryd"))
            .args([
                "--dir",
                self.dir.to_str().unwrap(),
                "--listen",
                &self.https,
                "--name",
                &self.name,
            ])
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_LOG")
                    .unwrap_or_else(|_| "info,ferryd=debug,ferry_drivers=debug".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ferryd");
        self.child = Some(child);
        let sock = self.dir.join("unix.socket");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() || std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("({st}) {}", self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "ferryd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stop ferryd with SIGTERM (instances keep running) and start it again on the same dir.
    pub fn restart_daemon(&mut self) {
        let mut child = self.child.take().expect("ferryd running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let st = child.wait().expect("wait ferryd");
        assert!(st.success(), "ferryd exited with {st} on SIGTERM");
        self.spawn();
    }

    /// SIGKILL ferryd (a crash); instances keep running.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start ferryd again on the same data dir after `kill_daemon`.
    pub fn start_daemon(&mut self) {
        assert!(self.child.is_none(), "ferryd still running");
        self.spawn();
    }

    /// The member's state-machine checksum and applied index (unix socket).
    pub async fn db_checksum(&self) -> (String, u64) {
        let (code, v) = self.raw(Method::GET, "/internal/db/checksum", None).await;
        assert_eq!(code, 200, "{v}");
        (
            v["checksum"].as_str().unwrap().to_string(),
            v["applied_index"].as_u64().unwrap(),
        )
    }

    pub fn log(&self) -> String {
        let p = self.tmp.as_ref().unwrap().path().join("ferryd.log");
        std::fs::read_to_string(p).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Run the `ferry` CLI against this member.
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("ferry"))
            .args(args)
            .env("FERRY_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- ferryd log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ferry launch IMAGE NAME [--vm] --target TARGET -c KEY=VALUE...`
    /// (a VM when the image is `testvm`), required to succeed.
    pub fn launch_on(&self, image: &str, name: &str, target: &str, config: &[&str]) {
        self.launch_in(image, name, target, None, config)
    }

    /// As [`Member::launch_on`], on storage pool `pool` (`--storage`) if given.
    pub fn launch_in(
        &self,
        image: &str,
        name: &str,
        target: &str,
        pool: Option<&str>,
        config: &[&str],
    ) {
        let mut args = vec!["launch", image, name, "--target", target];
        if let Some(pool) = pool {
            args.extend(["--storage", pool]);
        }
        if image == "testvm" {
            args.push("--vm");
        }
        for c in config {
            args.extend(["-c", c]);
        }
        self.ferry_ok(&args);
    }

    /// Send a request that creates an operation and wait for it; returns the final Operation JSON.
    pub async fn op(&self, method: Method, path: &str, body: Value) -> Result<Value, String> {
        match self
            .client
            .run_async(method, path, Some(&body), |_| {})
            .await
        {
            Ok(op) => Ok(serde_json::to_value(op).unwrap()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn op_ok(&self, method: Method, path: &str, body: Value) -> Value {
        match self.op(method.clone(), path, body).await {
            Ok(v) => v,
            Err(e) => panic!(
                "{method} {path} failed: {e}\n--- ferryd log tail:\n{}",
                tail(&self.log(), 40)
            ),
        }
    }

    pub async fn launch(&self, name: &str, kind: &str, image: &str, config: Value) {
        let body = json!({"name": name, "type": kind, "source": {"type": "image", "alias": image}, "config": config, "start": true});
        self.op_ok(Method::POST, "/1.0/instances", body).await;
    }

    pub async fn state(&self, name: &str, action: &str, stateful: bool) {
        let body = json!({"action": action, "stateful": stateful, "force": false, "timeout": 30});
        self.op_ok(Method::PUT, &format!("/1.0/instances/{name}/state"), body)
            .await;
    }

    /// GET returning the raw envelope JSON and HTTP status.
    pub async fn raw(&self, method: Method, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        raw_unix(&self.dir.join("unix.socket"), method.as_str(), path, body).await
    }

    pub async fn instance(&self, name: &str) -> Value {
        let (code, v) = self
            .raw(
                Method::GET,
                &format!("/1.0/instances/{name}?recursion=1"),
                None,
            )
            .await;
        assert_eq!(code, 200, "{v}");
        v["metadata"].clone()
    }

    /// Paths the daemon uses for an instance (mirrors daemon/src/core.rs).
    pub fn spec(&self, name: &str, vm: bool) -> ferry_drivers::InstanceSpec {
        let kind_dir = if vm { "virtual-machines" } else { "containers" };
        ferry_drivers::InstanceSpec {
            name: name.into(),
            kind: if vm {
                ferry_drivers::InstanceType::VirtualMachine
            } else {
                ferry_drivers::InstanceType::Container
            },
            image: if vm { "testvm" } else { "busybox" }.into(),
            config: Default::default(),
            volatile: Default::default(),
            paths: ferry_drivers::InstancePaths {
                volume: self
                    .dir
                    .join("storage-pools/default")
                    .join(kind_dir)
                    .join(name),
                run: self.dir.join("run").join(name),
                logs: self.dir.join("logs").join(name),
                images: self.dir.join("images"),
            },
        }
    }

    /// [`spec`](Self::spec) of an instance on the `shared` pool at `pool`.
    pub fn shared_spec(&self, name: &str, vm: bool, pool: &Path) -> ferry_drivers::InstanceSpec {
        let mut spec = self.spec(name, vm);
        let kind_dir = if vm { "virtual-machines" } else { "containers" };
        spec.paths.volume = pool.join(kind_dir).join(name);
        spec
    }

    /// The container's counter, read from its rootfs.
    pub fn container_counter(&self, name: &str) -> u64 {
        let p = self.spec(name, false).paths.volume.join("rootfs/counter");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // The writer may be mid-write: retry on an empty or partial read.
            if let Ok(s) = std::fs::read_to_string(&p) {
                if let Ok(n) = s.trim().parse() {
                    return n;
                }
            }
            assert!(Instant::now() < deadline, "no counter in {}", p.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cleanup(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            if let Ok(list) = std::fs::read_dir(self.dir.join("storage-pools/default/containers"))
                .into_iter()
                .flatten()
                .chain(
                    std::fs::read_dir(self.dir.join("storage-pools/default/virtual-machines"))
                        .into_iter()
                        .flatten(),
                )
                .collect::<Result<Vec<_>, _>>()
            {
                // An instance still moving (a test that failed mid-move) is
                // busy: wait for the move to end, or the daemon would be
                // killed under it and leave a restored process behind.
                let deadline = Instant::now() + Duration::from_secs(30);
                for e in list {
                    let name = e.file_name().to_string_lossy().into_owned();
                    loop {
                        let out = self.ferry(&["delete", "--force", &name]);
                        let busy = String::from_utf8_lossy(&out.stderr).contains("is busy");
                        if !busy || Instant::now() > deadline {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        kill_leftovers(&self.dir);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.cleanup();
        // For diagnosis: FERRY_TEST_KEEP_LOGS=DIR keeps each member's log there.
        if let Some(keep) = std::env::var_os("FERRY_TEST_KEEP_LOGS") {
            let _ = std::fs::create_dir_all(&keep);
            let dest = Path::new(&keep).join(format!("{}-{}.log", self.name, std::process::id()));
            let _ = std::fs::write(dest, self.log());
        }
        if std::thread::panicking() {
            eprintln!("--- ferryd log ({}):\n{}", self.name, tail(&self.log(), 80));
        }
    }
}

/// Kill processes whose pids are recorded under `DIR/run`, unmount anything
/// mounted below DIR.
pub fn kill_leftovers(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir.join("run")) {
        for inst in rd.flatten() {
            for f in std::fs::read_dir(inst.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".pid") && name != "pid" {
                    continue;
                }
                if let Some(pid) = std::fs::read_to_string(f.path())
                    .ok()
                    .and_then(|s| ferry_drivers::container::recorded_process(&s))
                {
                    if pid > 1 {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
    let dir_s = dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mine: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir_s))
        .collect();
    mine.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mine {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Minimal raw HTTP/1.1 over the unix socket, to send malformed bodies and see exact status codes.
pub async fn raw_unix(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .expect("connect");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: unix.socket\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Poll `f` until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where `ferry list` on `m` places instance `name` (its `location`).
pub fn location(m: &Member, name: &str) -> Option<String> {
    let list: Value = serde_json::from_str(&m.ferry_ok(&["list", "--format", "json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|i| i["name"] == name)
        .map(|i| i["location"].as_str().unwrap().to_string())
        .next()
}

/// A process that exists and is not a zombie.
pub fn pid_alive(pid: i64) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
                    .unwrap_or(true)
            })
            .unwrap_or(false)
}

pub mod bench;
