//! Reading `/proc`, the init record (pidfile) and deciding whether a
//! container is running.
//!
//! The container init is not a child of ferryd: the forkstart helper exits
//! right after the init has exec'd, and `criu restore -d` detaches as well, so
//! the init is re-parented to the nearest child subreaper or to the host's
//! pid 1. Whoever that is reaps it. We therefore never rely on `waitpid`: an
//! init is "running" when `/proc/<pid>/stat` exists, is not a zombie, and its
//! start time matches the one recorded when it was started. That survives
//! ferryd restarts and pid reuse. When ferryd happens to be the parent (it set
//! `PR_SET_CHILD_SUBREAPER`), [`reap_if_our_zombie`] reaps the zombie so it
//! does not linger.

use std::collections::HashMap;
use std::path::Path;

/// The fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    /// Start time in clock ticks after boot (field 22).
    pub starttime: u64,
}

/// Parse the content of `/proc/<pid>/stat`. The command name may contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(s: &str) -> Option<ProcStat> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        starttime: f.get(19)?.parse().ok()?,
    })
}

pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// What ferry records about a started container init: `PID STARTTIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitRecord {
    pub pid: u32,
    /// `None` for a bare pidfile (as CRIU writes it): start time unchecked.
    pub starttime: Option<u64>,
}

impl InitRecord {
    pub fn parse(s: &str) -> Option<InitRecord> {
        let mut it = s.split_whitespace();
        let pid: u32 = it.next()?.parse().ok()?;
        if pid <= 1 {
            return None;
        }
        let starttime = match it.next() {
            Some(t) => Some(t.parse().ok()?),
            None => None,
        };
        if it.next().is_some() {
            return None;
        }
        Some(InitRecord { pid, starttime })
    }

    pub fn format(&self) -> String {
        match self.starttime {
            Some(t) => format!("{} {}\n", self.pid, t),
            None => format!("{}\n", self.pid),
        }
    }

    /// Record for a live pid, reading its start time now.
    pub fn of_pid(pid: u32) -> Option<InitRecord> {
        let st = read_stat(pid)?;
        Some(InitRecord {
            pid,
            starttime: Some(st.starttime),
        })
    }

    pub fn read(path: &Path) -> Option<InitRecord> {
        InitRecord::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Write atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.format())?;
        std::fs::rename(&tmp, path)
    }
}

/// The state decision: is the recorded init alive right now?
/// A missing process, a zombie (`Z`) or dead (`X`) task, or a different start
/// time (the pid was reused) all mean "not running".
pub fn is_running(rec: &InitRecord, stat: Option<&ProcStat>) -> bool {
    let Some(st) = stat else { return false };
    if matches!(st.state, 'Z' | 'X' | 'x') {
        return false;
    }
    match rec.starttime {
        Some(t) => t == st.starttime,
        None => true,
    }
}

/// Whether `rec` names a zombie that is still the process we started.
pub fn is_our_zombie(rec: &InitRecord, stat: Option<&ProcStat>) -> bool {
    match (stat, rec.starttime) {
        (Some(st), Some(t)) => st.state == 'Z' && st.starttime == t,
        (Some(st), None) => st.state == 'Z',
        (None, _) => false,
    }
}

/// If the init is a zombie and we are its parent (ferryd is a child
/// subreaper), reap it. Only done after checking the start time, so we never
/// steal the exit status of an unrelated child that reused the pid.
pub fn reap_if_our_zombie(rec: &InitRecord) {
    if is_our_zombie(rec, read_stat(rec.pid).as_ref()) {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(rec.pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
}

/// The live process a pidfile's text names: a container's init record
/// (`PID STARTTIME`, the start time checked) or a bare pid (QEMU's, CRIU's).
/// `None` if it is gone, a zombie, or the pid was reused. Reaps nothing.
pub fn recorded_process(text: &str) -> Option<u32> {
    InitRecord::parse(text)
        .filter(|r| is_running(r, read_stat(r.pid).as_ref()))
        .map(|r| r.pid)
}

/// Check liveness (reaping our own zombie first).
pub fn check_running(rec: &InitRecord) -> bool {
    reap_if_our_zombie(rec);
    is_running(rec, read_stat(rec.pid).as_ref())
}

/// Count `root` and all its live descendants, from a (pid, ppid) list.
pub fn count_tree(root: u32, procs: &[(u32, u32)]) -> usize {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(pid, ppid) in procs {
        children.entry(ppid).or_default().push(pid);
    }
    let mut stack = vec![root];
    let mut n = 0;
    while let Some(p) = stack.pop() {
        n += 1;
        if let Some(c) = children.get(&p) {
            stack.extend(c.iter().copied());
        }
    }
    n
}

/// All non-zombie processes on the host as (pid, ppid).
pub fn list_procs() -> Vec<(u32, u32)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let st = read_stat(pid)?;
            (st.state != 'Z').then_some((pid, st.ppid))
        })
        .collect()
}

/// The pids of `root` and its descendants.
pub fn tree_pids(root: u32) -> Vec<u32> {
    let procs = list_procs();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(procs.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Whether `pid` descends from `root`, following `parent` links (bounded).
pub fn descends_from(pid: u32, root: u32, parent: impl Fn(u32) -> Option<u32>) -> bool {
    let mut p = pid;
    for _ in 0..4096 {
        if p == root {
            return true;
        }
        match parent(p) {
            Some(pp) if pp > 1 && pp != p => p = pp,
            _ => return false,
        }
    }
    false
}

pub fn pidns_of(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Live processes in `init`'s pid namespace that are not descendants of
/// `init` (e.g. commands started by exec: their parent is nsenter, outside).
/// CRIU dumps only init's tree, so these would be lost. A process counts
/// only if three scans 20 ms apart all see it outside: a short-lived child
/// (the init's `sleep`) that exits, or whose parent exits, between two reads
/// of /proc looks parentless for an instant.
pub fn outside_tree(init: u32) -> Vec<u32> {
    let mut strays = scan_outside_tree(init);
    for _ in 0..2 {
        if strays.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let again = scan_outside_tree(init);
        strays.retain(|p| again.contains(p));
    }
    strays
}

/// Refuse to checkpoint a container whose pid namespace holds processes CRIU
/// would not save; `instead` says what the user can do otherwise.
pub fn ensure_no_strays(name: &str, init: u32, instead: &str) -> Result<(), crate::DriverError> {
    let strays = outside_tree(init);
    if strays.is_empty() {
        return Ok(());
    }
    Err(crate::DriverError::WrongState(format!(
        "container {name} runs processes outside its init's tree (exec sessions, host pids {strays:?}); \
         CRIU would not save them: wait for them to end, or {instead}"
    )))
}

fn scan_outside_tree(init: u32) -> Vec<u32> {
    let Some(ns) = pidns_of(init) else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.into_iter()
        .filter(|&p| p != init && pidns_of(p).as_ref() == Some(&ns))
        .filter(|&p| {
            // Gone or zombie by now: not a problem.
            read_stat(p).is_some_and(|st| st.state != 'Z')
                && !descends_from(p, init, |q| read_stat(q).map(|st| st.ppid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";

    #[test]
    fn a_pidfile_names_a_process_only_while_its_start_time_matches() {
        let me = std::process::id();
        let started = read_stat(me).unwrap().starttime;
        assert_eq!(recorded_process(&format!("{me}\n")), Some(me));
        assert_eq!(recorded_process(&format!("{me} {started}\n")), Some(me));
        assert_eq!(recorded_process(&format!("{me} 1{started}\n")), None);
        assert_eq!(recorded_process("not a pid"), None);
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let st = parse_stat(STAT).unwrap();
        assert_eq!(
            st,
            ProcStat {
                state: 'S',
                ppid: 1,
                starttime: 987654
            }
        );
        assert!(parse_stat("12 (x) S 1").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn pidfile_roundtrip_and_rejects() {
        let r = InitRecord {
            pid: 77,
            starttime: Some(123),
        };
        assert_eq!(InitRecord::parse(&r.format()), Some(r));
        assert_eq!(
            InitRecord::parse("77\n"),
            Some(InitRecord {
                pid: 77,
                starttime: None
            })
        );
        for bad in ["", "abc", "1", "0 5", "77 x", "77 1 2", "-5"] {
            assert_eq!(InitRecord::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn running_decisions() {
        let rec = InitRecord {
            pid: 77,
            starttime: Some(100),
        };
        let st = |state, starttime| ProcStat {
            state,
            ppid: 1,
            starttime,
        };
        assert!(is_running(&rec, Some(&st('S', 100))));
        assert!(is_running(&rec, Some(&st('R', 100))));
        assert!(!is_running(&rec, None), "gone");
        assert!(!is_running(&rec, Some(&st('Z', 100))), "zombie");
        assert!(!is_running(&rec, Some(&st('S', 101))), "pid reused");
        let bare = InitRecord {
            pid: 77,
            starttime: None,
        };
        assert!(is_running(&bare, Some(&st('S', 5))));
        assert!(is_our_zombie(&rec, Some(&st('Z', 100))));
        assert!(!is_our_zombie(&rec, Some(&st('Z', 99))));
        assert!(!is_our_zombie(&rec, Some(&st('S', 100))));
    }

    #[test]
    fn ancestry() {
        let parent = |p: u32| {
            [(12, 11), (11, 10), (10, 1), (30, 20), (20, 1)]
                .iter()
                .find(|x| x.0 == p)
                .map(|x| x.1)
        };
        assert!(descends_from(12, 10, parent));
        assert!(descends_from(10, 10, parent));
        assert!(!descends_from(30, 10, parent));
        assert!(!descends_from(99, 10, parent));
    }

    #[test]
    fn counts_tree() {
        let procs = [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (21, 20)];
        assert_eq!(count_tree(10, &procs), 4);
        assert_eq!(count_tree(21, &procs), 1);
    }

    #[test]
    fn reads_own_stat() {
        let me = std::process::id();
        let rec = InitRecord::of_pid(me).unwrap();
        assert!(check_running(&rec));
        assert!(tree_pids(me).contains(&me));
    }
}
