//! QEMU processes: command line, launch (`-daemonize`, so QEMU outlives
//! ferryd), liveness from the pidfile and `/proc`, and killing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;

use super::config::VmConfig;
use crate::{DriverError, InstanceSpec};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The QEMU binary to run: `$FERRY_QEMU` if set (e.g. to run a member on
/// Debian's QEMU 7.2 beside 10.0), else `qemu-system-x86_64` from PATH.
pub fn qemu_binary() -> String {
    std::env::var("FERRY_QEMU")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| QEMU_BINARY.to_string())
}
/// Versioned machine type known to QEMU 7.2 and newer: the guest ABI (and the
/// migration stream) stays the same whichever QEMU a member runs.
pub const MACHINE: &str = "pc-i440fx-7.2";
/// Oldest QEMU we drive (Debian bookworm).
pub const MIN_VERSION: (u32, u32) = (7, 2);

/// Files of one VM.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub disk: PathBuf,
    pub qmp: PathBuf,
    pub pidfile: PathBuf,
    pub console: PathBuf,
    pub state_dir: PathBuf,
    pub state_file: PathBuf,
    pub state_meta: PathBuf,
}

impl VmFiles {
    pub fn of(spec: &InstanceSpec) -> VmFiles {
        let p = &spec.paths;
        let state_dir = p.state_dir();
        VmFiles {
            disk: p.volume.join("disk.img"),
            qmp: p.run.join("qmp.sock"),
            pidfile: p.run.join("qemu.pid"),
            console: p.logs.join("console.log"),
            state_file: state_dir.join("memory.state"),
            state_meta: state_dir.join("vm.json"),
            state_dir,
        }
    }
}

/// Accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// How to start QEMU.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    pub machine: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// Wait for `migrate-incoming` (`-incoming defer`) and stay paused (`-S`).
    pub incoming: bool,
    /// With `incoming`: leave out `-S`, so QEMU resumes the guest by itself as
    /// soon as the incoming migration completes (or switches to post-copy),
    /// if it was running on the source. Used by live migration.
    pub autostart: bool,
}

impl Launch {
    pub fn new(spec: &InstanceSpec, cfg: &VmConfig, accel: Accel) -> Launch {
        Launch {
            name: spec.name.clone(),
            machine: MACHINE.into(),
            memory_mib: cfg.memory_mib,
            cpus: cfg.cpus,
            accel,
            incoming: false,
            autostart: false,
        }
    }
}

/// QEMU's option syntax: a ',' inside a value is written ",,".
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The QEMU command line (without the binary). Devices must be identical for
/// a cold boot and an incoming migration; only `-incoming defer -S` differ.
pub fn build_args(l: &Launch, f: &VmFiles) -> Vec<String> {
    let accel = match l.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", l.name.replace(',', ",,")),
        "-machine".into(),
        l.machine.clone(),
        "-accel".into(),
        accel.into(),
        "-m".into(),
        format!("{}M", l.memory_mib),
        "-smp".into(),
        l.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-drive".into(),
        format!("file={},format=raw,if=ide,index=0,media=disk", esc(&f.disk)),
        "-chardev".into(),
        format!("file,id=console,path={},append=on", esc(&f.console)),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("socket,id=qmp,path={},server=on,wait=off", esc(&f.qmp)),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-pidfile".into(),
        f.pidfile.to_string_lossy().into_owned(),
        "-daemonize".into(),
    ];
    if l.incoming {
        a.extend(["-incoming".into(), "defer".into()]);
        if !l.autostart {
            a.push("-S".into());
        }
    }
    a
}

/// Parse `QEMU emulator version 10.0.2 (Debian ...)`.
pub fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let rest = out.split("version").nth(1)?.trim_start();
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// The installed QEMU's version (asked once per process and binary).
pub async fn qemu_version() -> Result<(u32, u32, u32), DriverError> {
    type Cache = Mutex<HashMap<String, (u32, u32, u32)>>;
    static VERSIONS: OnceLock<Cache> = OnceLock::new();
    let bin = qemu_binary();
    let cache = VERSIONS.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap().get(&bin) {
        return Ok(*v);
    }
    let missing = |detail: String| DriverError::MissingTool {
        tool: bin.clone(),
        detail,
    };
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .await
        .map_err(|e| missing(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = parse_version(&text)
        .ok_or_else(|| missing(format!("cannot read its version from {:?}", text.trim())))?;
    if (v.0, v.1) < MIN_VERSION {
        return Err(missing(format!(
            "version {}.{}.{} is older than {}.{}",
            v.0, v.1, v.2, MIN_VERSION.0, MIN_VERSION.1
        )));
    }
    cache.lock().unwrap().insert(bin, v);
    Ok(v)
}

/// KVM when /dev/kvm can be opened, else TCG (with a warning: much slower).
pub fn pick_accel() -> Accel {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Accel::Kvm,
        Err(e) => {
            tracing::warn!("/dev/kvm is not usable ({e}): running VMs under TCG emulation, which is much slower");
            Accel::Tcg
        }
    }
}

/// Start QEMU; returns once it has daemonized (QMP socket listening).
pub async fn launch(l: &Launch, f: &VmFiles) -> Result<u32, DriverError> {
    for dir in [f.qmp.parent(), f.console.parent()].into_iter().flatten() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(DriverError::io(format!("create {}", dir.display())))?;
    }
    if f.qmp.as_os_str().len() >= 108 {
        return Err(DriverError::InvalidConfig(format!(
            "QMP socket path {} is too long for a unix socket (max 107 bytes)",
            f.qmp.display()
        )));
    }
    let _ = std::fs::remove_file(&f.pidfile);
    let _ = std::fs::remove_file(&f.qmp);
    let args = build_args(l, f);
    let bin = qemu_binary();
    tracing::debug!("starting {bin} {}", args.join(" "));
    let cmd = Command::new(&bin)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), cmd)
        .await
        .map_err(|_| DriverError::Timeout(format!("{bin} did not daemonize within 60 s")))?
        .map_err(|e| DriverError::MissingTool {
            tool: bin.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(DriverError::Command {
            program: bin.clone(),
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    read_pid(&f.pidfile).ok_or_else(|| DriverError::Command {
        program: bin.clone(),
        detail: format!("started but wrote no pid to {}", f.pidfile.display()),
    })
}

pub fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// The pid of this VM's QEMU if it is alive: the pidfile's process exists,
/// is not a zombie, and its command line names our QMP socket (so a recycled
/// pid is not mistaken for our VM).
pub fn running_pid(f: &VmFiles) -> Option<u32> {
    let pid = read_pid(&f.pidfile)?;
    is_our_qemu(pid, &f.qmp).then_some(pid)
}

fn is_our_qemu(pid: u32, qmp: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = esc(qmp);
    cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
}

/// vCPU threads ("CPU n/KVM" or "CPU n/TCG" with debug-threads=on) and RSS bytes.
pub fn usage(pid: u32) -> (i64, i64) {
    let mut vcpus = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) {
                if comm.starts_with("CPU ") {
                    vcpus += 1;
                }
            }
        }
    }
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    (vcpus, rss)
}

/// Wait until the VM's QEMU is gone; true if it exited within `timeout`.
pub async fn wait_exit(f: &VmFiles, pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_our_qemu(pid, &f.qmp) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Short: a move's clean-up (QEMU's quit) waits on this.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Send `sig` to our QEMU (only if the pid is still our QEMU).
pub fn signal(f: &VmFiles, pid: u32, sig: Signal) {
    if is_our_qemu(pid, &f.qmp) {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Before a launch: no QEMU of this VM runs on this member yet, and its
/// disk is there (`no_disk` says how to get it, if not).
pub fn check_launchable(name: &str, f: &VmFiles, no_disk: &str) -> Result<(), DriverError> {
    if let Some(pid) = running_pid(f) {
        return Err(DriverError::WrongState(format!(
            "VM {name} already runs on this member (QEMU pid {pid})"
        )));
    }
    if !f.disk.exists() {
        return Err(DriverError::WrongState(format!(
            "VM {name} has no disk at {}{no_disk}",
            f.disk.display()
        )));
    }
    Ok(())
}

/// SIGKILL and wait; then remove the runtime files.
pub async fn kill_and_clean(f: &VmFiles, pid: u32) -> Result<(), DriverError> {
    signal(f, pid, Signal::SIGKILL);
    if !wait_exit(f, pid, Duration::from_secs(10)).await {
        return Err(DriverError::Timeout(format!(
            "QEMU (pid {pid}) did not die after SIGKILL within 10 s"
        )));
    }
    clean_runtime(f);
    Ok(())
}

pub fn clean_runtime(f: &VmFiles) {
    let _ = std::fs::remove_file(&f.pidfile);
    let _ = std::fs::remove_file(&f.qmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> VmFiles {
        VmFiles {
            disk: "/v/x,y/disk.img".into(),
            qmp: "/r/qmp.sock".into(),
            pidfile: "/r/qemu.pid".into(),
            console: "/l/console.log".into(),
            state_dir: "/v/state".into(),
            state_file: "/v/state/memory.state".into(),
            state_meta: "/v/state/vm.json".into(),
        }
    }

    #[test]
    fn command_line() {
        let l = Launch {
            name: "v1".into(),
            machine: MACHINE.into(),
            memory_mib: 512,
            cpus: 2,
            accel: Accel::Kvm,
            incoming: false,
            autostart: false,
        };
        let a = build_args(&l, &files());
        let s = a.join(" ");
        assert!(
            s.contains("-machine pc-i440fx-7.2 -accel kvm -m 512M -smp 2 -nodefaults"),
            "{s}"
        );
        assert!(
            s.contains("-drive file=/v/x,,y/disk.img,format=raw,if=ide"),
            "{s}"
        );
        assert!(
            s.contains(
                "-chardev file,id=console,path=/l/console.log,append=on -serial chardev:console"
            ),
            "{s}"
        );
        assert!(s.contains("-chardev socket,id=qmp,path=/r/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control"));
        assert!(s.contains("-pidfile /r/qemu.pid -daemonize"));
        assert!(!s.contains("-incoming"));
        let inc = build_args(
            &Launch {
                incoming: true,
                accel: Accel::Tcg,
                ..l.clone()
            },
            &files(),
        );
        assert!(inc.join(" ").ends_with("-incoming defer -S"));
        assert!(inc.join(" ").contains("-accel tcg"));
        let live = build_args(
            &Launch {
                incoming: true,
                autostart: true,
                ..l.clone()
            },
            &files(),
        );
        assert!(
            live.join(" ").ends_with("-daemonize -incoming defer"),
            "{live:?}"
        );
        // Identical devices apart from the incoming flags.
        assert_eq!(
            &inc[..inc.len() - 3]
                .iter()
                .filter(|x| *x != "tcg")
                .collect::<Vec<_>>(),
            &a.iter().filter(|x| *x != "kvm").collect::<Vec<_>>()
        );
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u16)"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_version("QEMU emulator version 8.1"), Some((8, 1, 0)));
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn not_running_without_pidfile() {
        assert_eq!(running_pid(&files()), None);
        // Our own pid is alive but is not a QEMU with that socket.
        let dir = tempfile::tempdir().unwrap();
        let mut f = files();
        f.pidfile = dir.path().join("pid");
        std::fs::write(&f.pidfile, std::process::id().to_string()).unwrap();
        assert_eq!(running_pid(&f), None);
    }
}
