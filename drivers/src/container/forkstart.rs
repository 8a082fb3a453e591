//! `ferryd forkstart`: the helper that creates a container's init.
//!
//! ferryd is a multithreaded tokio process, where fork() followed by real work
//! is unsafe; so the driver re-executes its own binary (or the configured
//! helper) as `<helper> forkstart --name N --rootfs DIR --pidfile FILE
//! [--cgroup PROCS_FILE]`, which runs single-threaded:
//!
//! 1. joins the container's cgroup (the init inherits it),
//! 2. `unshare(PID)` and forks; the child is pid 1 of the new pid namespace
//!    and
//!    - unshares mount, UTS, IPC and net namespaces, makes all mounts private, sets the host name, mounts /proc,
//!    - `pivot_root`s into the rootfs (already bind-mounted onto itself by the
//!      driver) and detaches the old root,
//!    - calls `setsid`, points fd 0 at the rootfs's /dev/null and fds 1-2
//!      at the console log `/var/log/console.log` (see `console`), marks
//!      every other fd close-on-exec, resets signal dispositions and mask,
//!    - execs `/sbin/init`;
//! 3. the parent waits on a close-on-exec pipe: EOF means exec succeeded,
//!    bytes are the child's error. It then writes the pidfile (`PID
//!    STARTTIME`) and exits without waiting for the init, which is
//!    re-parented (see `procfs` for who reaps it).

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, dup2, execve, fork, pivot_root, sethostname, setsid, ForkResult};

use super::procfs::InitRecord;

/// Arguments of the helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkstartArgs {
    pub name: String,
    pub rootfs: PathBuf,
    pub pidfile: PathBuf,
    /// `cgroup.procs` of the container's cgroups (one per hierarchy), if any.
    pub cgroup_procs: Vec<PathBuf>,
}

impl ForkstartArgs {
    /// The helper's command line after `forkstart`.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--name".to_string(),
            self.name.clone(),
            "--rootfs".into(),
            self.rootfs.display().to_string(),
            "--pidfile".into(),
            self.pidfile.display().to_string(),
        ];
        for c in &self.cgroup_procs {
            v.push("--cgroup".into());
            v.push(c.display().to_string());
        }
        v
    }

    /// Parse the arguments after `forkstart` (a leading `forkstart` is skipped).
    pub fn parse(args: &[String]) -> Result<ForkstartArgs, String> {
        let args = match args.first() {
            Some(a) if a == "forkstart" => &args[1..],
            _ => args,
        };
        let (mut name, mut rootfs, mut pidfile, mut cgroup) = (None, None, None, Vec::new());
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let val = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .clone();
            match flag.as_str() {
                "--name" => name = Some(val),
                "--rootfs" => rootfs = Some(PathBuf::from(val)),
                "--pidfile" => pidfile = Some(PathBuf::from(val)),
                "--cgroup" => cgroup.push(PathBuf::from(val)),
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        let a = ForkstartArgs {
            name: name.ok_or("--name is required")?,
            rootfs: rootfs.ok_or("--rootfs is required")?,
            pidfile: pidfile.ok_or("--pidfile is required")?,
            cgroup_procs: cgroup,
        };
        if !a.rootfs.is_absolute() || !a.pidfile.is_absolute() {
            return Err("--rootfs and --pidfile must be absolute paths".into());
        }
        Ok(a)
    }
}

/// Entry point of `ferryd forkstart ARGS...`; returns the exit code.
/// Must be called before any other thread exists.
pub fn forkstart_main(args: &[String]) -> i32 {
    let a = match ForkstartArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("forkstart: {e}");
            return 2;
        }
    };
    match run(&a) {
        Ok(pid) => {
            println!("{pid}");
            0
        }
        Err(e) => {
            eprintln!("forkstart: {e}");
            1
        }
    }
}

fn run(a: &ForkstartArgs) -> Result<u32, String> {
    for procs in &a.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| format!("join cgroup {}: {e}", procs.display()))?;
    }
    // Only the pid namespace is unshared here (it applies to the next
    // child); the child unshares the rest itself, so that its pivot_root
    // does not also move this process's root and /proc.
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare pid namespace: {e}"))?;
    let (rd, wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the helper is single-threaded (called from main before any
    // runtime exists), so the child may allocate and run normal code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(rd);
            let err = child(a, &wr);
            let mut f = std::fs::File::from(wr);
            let _ = f.write_all(err.as_bytes());
            // SAFETY: leave without running the parent's atexit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            let pid = child.as_raw() as u32;
            if !msg.is_empty() {
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(format!("container init setup failed: {msg}"));
            }
            let rec = InitRecord::of_pid(pid)
                .ok_or_else(|| format!("container init {pid} exited right away"))?;
            rec.write(&a.pidfile)
                .map_err(|e| format!("write {}: {e}", a.pidfile.display()))?;
            Ok(pid)
        }
    }
}

/// Set up and exec the container init. Returns only on error (the message).
fn child(a: &ForkstartArgs, errpipe: &OwnedFd) -> String {
    match child_setup(a, errpipe) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn child_setup(a: &ForkstartArgs, errpipe: &OwnedFd) -> Result<std::convert::Infallible, String> {
    let none = None::<&str>;
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    ctx(unshare(flags), "unshare mount/uts/ipc/net namespaces")?;
    ctx(
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none),
        "make / private",
    )?;
    ctx(sethostname(&a.name), "sethostname")?;
    let root = &a.rootfs;
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    ctx(
        mount(
            Some("proc"),
            &root.join("proc"),
            Some("proc"),
            proc_flags,
            none,
        ),
        "mount /proc",
    )?;
    ctx(chdir(root.as_path()), "chdir rootfs")?;
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // lazy unmount then drops it (as runc does).
    ctx(pivot_root(".", "."), "pivot_root")?;
    ctx(umount2(".", MntFlags::MNT_DETACH), "detach old root")?;
    ctx(chdir("/"), "chdir /")?;
    ctx(setsid(), "setsid")?;
    stdio_setup(Path::new("/dev/null"))?;
    // Every fd but 0-2 closes at exec, including the error pipe: EOF tells
    // the parent the exec succeeded.
    let _ = errpipe.as_raw_fd();
    // SAFETY: plain syscall; CLOSE_RANGE_CLOEXEC = 4.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) } != 0 {
        return Err(format!("close_range: {}", std::io::Error::last_os_error()));
    }
    reset_signals();
    let init = CString::new("/sbin/init").unwrap();
    let env = [
        "PATH=/bin:/sbin:/usr/bin:/usr/sbin",
        "HOME=/root",
        "TERM=dumb",
        "container=ferry",
    ]
    .map(|s| CString::new(s).unwrap());
    let e = execve(&init, std::slice::from_ref(&init), &env).unwrap_err();
    Err(format!("exec /sbin/init: {e}"))
}

/// stdin from the container's /dev/null, stdout and stderr appended to its
/// console log: files on the container's root mount, which CRIU restores by
/// path (a host file would make the container impossible to checkpoint).
fn stdio_setup(devnull: &Path) -> Result<(), String> {
    let f = ctx(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(devnull),
        "open /dev/null",
    )?;
    ctx(dup2(f.as_raw_fd(), 0), "dup2 /dev/null")?;
    let log = super::console::open_for_init()?;
    for fd in 1..3 {
        ctx(dup2(log.as_raw_fd(), fd), "dup2 console log")?;
    }
    Ok(())
}

/// Default dispositions and an empty mask: the Rust runtime ignores SIGPIPE,
/// and ignored signals would stay ignored in the init.
fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL is always sound.
            let _ = unsafe { sigaction(sig, &dfl) };
        }
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args_roundtrip() {
        let a = ForkstartArgs {
            name: "c1".into(),
            rootfs: "/v/c1/rootfs".into(),
            pidfile: "/run/c1/init.pid".into(),
            cgroup_procs: vec![
                "/sys/fs/cgroup/memory/ferry/c1/cgroup.procs".into(),
                "/sys/fs/cgroup/cpu/ferry/c1/cgroup.procs".into(),
            ],
        };
        assert_eq!(ForkstartArgs::parse(&a.to_args()), Ok(a.clone()));
        let mut with_verb = vec!["forkstart".to_string()];
        with_verb.extend(a.to_args());
        assert_eq!(ForkstartArgs::parse(&with_verb), Ok(a));
    }

    #[test]
    fn args_errors() {
        assert!(ForkstartArgs::parse(&s(&["--name"])).is_err());
        assert!(ForkstartArgs::parse(&s(&["--name", "c1", "--rootfs", "/r"])).is_err());
        assert!(
            ForkstartArgs::parse(&s(&["--name", "c1", "--rootfs", "r", "--pidfile", "/p"]))
                .is_err()
        );
        assert!(ForkstartArgs::parse(&s(&["--bogus", "x"])).is_err());
        let ok = ForkstartArgs::parse(&s(&["--name", "c1", "--rootfs", "/r", "--pidfile", "/p"]))
            .unwrap();
        assert!(ok.cgroup_procs.is_empty());
    }
}
