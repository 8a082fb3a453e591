//! While a VM migrates away, its vCPU threads yield the CPU to the migration.
//!
//! Pre-copy is a race between the guest dirtying memory and the migration
//! sending it. On a member whose cores are all busy, the guest's vCPUs take
//! their fair share of the CPU that QEMU's migration thread, ferry's relay
//! and (on one machine) the target QEMU need, so the move takes longer and
//! the guest re-dirties more while it runs. For the length of the outgoing
//! migration (for a move, from its agreed plan on, the disk mirror
//! included: see [`super::VmDriver::lower_vcpu_priority`]) ferry raises the
//! nice value of the source QEMU's vCPU threads (the threads
//! `query-cpus-fast` names), and puts back what they had when it ends,
//! however it ends. On a member with idle cores this changes
//! nothing: a thread's nice value only matters when threads compete for a
//! core. QEMU's auto-converge slows the guest for the same reason, by
//! throttling it; this only reorders who runs first when there is no room.
//!
//! `FERRY_VCPU_NICE` sets the value (0 turns it off, for comparisons).

use serde_json::json;

use super::qmp::Qmp;

/// The nice value the vCPU threads get during an outgoing migration.
const VCPU_NICE: i32 = 19;

pub(super) fn migration_vcpu_nice() -> i32 {
    std::env::var("FERRY_VCPU_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(VCPU_NICE)
        .clamp(0, 19)
}

/// The vCPU threads whose nice value was raised to `nice`, with the value
/// each had. Dropping it puts them back.
#[derive(Debug, Default)]
#[must_use = "dropping the guard puts the vCPU threads' priority back at once"]
pub struct VcpuPriority {
    nice: i32,
    saved: Vec<(i32, i32)>,
    /// A vCPU thread runs at `nice` or above meanwhile, lowered here or
    /// already (by an outer guard).
    yielding: bool,
}

impl VcpuPriority {
    /// Raise the nice value of the VM's vCPU threads to `nice` (never
    /// lowers one that is already higher). Best effort: a thread that cannot
    /// be reniced is logged and left as it is.
    pub(super) async fn lower(qmp: &mut Qmp, nice: i32) -> VcpuPriority {
        let mut p = VcpuPriority {
            nice,
            saved: Vec::new(),
            yielding: false,
        };
        if nice <= 0 {
            return p;
        }
        let cpus = match qmp.execute_raw("query-cpus-fast", json!({})).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("query-cpus-fast (vCPU threads): {e}");
                return p;
            }
        };
        for tid in thread_ids(&cpus) {
            let Some(was) = nice_of(tid) else { continue };
            if was >= nice {
                p.yielding = true;
                continue;
            }
            if set_nice(tid, nice) {
                p.saved.push((tid, was));
                p.yielding = true;
            } else {
                tracing::warn!(tid, "could not renice a vCPU thread for the migration");
            }
        }
        tracing::debug!(
            threads = p.saved.len(),
            nice,
            "vCPU threads yield to the migration"
        );
        p
    }

    /// Put back the nice values the threads had (dropping does the same).
    /// Returns the value they ran at meanwhile (0: they did not yield).
    pub(super) fn restore(self) -> i32 {
        if self.yielding {
            self.nice
        } else {
            0
        }
    }
}

impl Drop for VcpuPriority {
    fn drop(&mut self) {
        for (tid, was) in self.saved.drain(..) {
            // The thread may be gone with its QEMU: nothing to restore then.
            let _ = set_nice(tid, was);
        }
    }
}

impl super::VmDriver {
    /// The VM's vCPU threads yield to an outgoing live move from its start:
    /// the disk mirror and the target's start compete for the same cores as
    /// the RAM migration does ([`migrate_outgoing`](Self::migrate_outgoing)
    /// lowers them for the RAM part by itself; threads already lowered are
    /// left to this guard). Best effort: a VM whose QEMU does not answer
    /// gets an empty guard.
    pub async fn lower_vcpu_priority(&self, spec: &crate::InstanceSpec) -> VcpuPriority {
        let f = super::qemu::VmFiles::of(spec);
        if super::qemu::running_pid(&f).is_none() {
            return VcpuPriority::default();
        }
        match Qmp::connect(&f.qmp, std::time::Duration::from_secs(2)).await {
            Ok(mut qmp) => VcpuPriority::lower(&mut qmp, migration_vcpu_nice()).await,
            Err(e) => {
                tracing::warn!("{}: QMP for the vCPU threads' priority: {e}", spec.name);
                VcpuPriority::default()
            }
        }
    }

    /// After a ferryd restart: a ferryd that died during an outgoing
    /// migration could not put its vCPU threads back. Any thread of the
    /// VM's QEMU whose nice value is above the main thread's gets the main
    /// thread's. Returns how many were put back (0 if QEMU does not run).
    pub fn restore_vcpu_priority(&self, spec: &crate::InstanceSpec) -> usize {
        let f = super::qemu::VmFiles::of(spec);
        match super::qemu::running_pid(&f) {
            Some(pid) => level_threads(pid as i32),
            None => 0,
        }
    }
}

/// Put every thread of `pid` whose nice value is above the main thread's
/// back to the main thread's.
fn level_threads(pid: i32) -> usize {
    let Some(main) = nice_of(pid) else { return 0 };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
        .filter(|tid| nice_of(*tid).is_some_and(|n| n > main))
        .filter(|tid| set_nice(*tid, main))
        .count()
}

/// The `thread-id`s of a `query-cpus-fast` answer.
fn thread_ids(v: &serde_json::Value) -> Vec<i32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.get("thread-id")?.as_i64())
                .filter_map(|t| i32::try_from(t).ok())
                .filter(|t| *t > 0)
                .collect()
        })
        .unwrap_or_default()
}

fn nice_of(tid: i32) -> Option<i32> {
    // SAFETY: getpriority(2) only; -1 is a valid value, so errno tells.
    unsafe {
        *libc::__errno_location() = 0;
        let v = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (v != -1 || *libc::__errno_location() == 0).then_some(v)
    }
}

fn set_nice(tid: i32, nice: i32) -> bool {
    // SAFETY: setpriority(2) on one thread (Linux: a TID names the thread).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ids_from_query_cpus_fast() {
        let v = json!([
            {"cpu-index": 0, "thread-id": 4242, "qom-path": "/machine/unattached/device[0]"},
            {"cpu-index": 1, "thread-id": 4243},
            {"cpu-index": 2},
        ]);
        assert_eq!(thread_ids(&v), vec![4242, 4243]);
        assert!(thread_ids(&json!({})).is_empty());
    }

    #[test]
    fn renices_a_thread_and_puts_it_back() {
        // SAFETY: geteuid(2). Lowering a nice value needs CAP_SYS_NICE.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: putting a nice value back needs root");
            return;
        }
        // A thread of this test process stands in for a vCPU thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid(2).
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = nice_of(tid).unwrap();
        assert!(before < 19, "the test thread starts at nice {before}");
        let p = VcpuPriority {
            nice: 19,
            saved: vec![(tid, before)],
            yielding: true,
        };
        assert!(set_nice(tid, 19));
        assert_eq!(nice_of(tid), Some(19));
        assert_eq!(p.restore(), 19);
        assert_eq!(nice_of(tid), Some(before));
        // A thread left behind at 19 (its ferryd died) is put back.
        assert!(set_nice(tid, 19));
        let main = nice_of(std::process::id() as i32).unwrap();
        assert!(level_threads(std::process::id() as i32) >= 1);
        assert_eq!(nice_of(tid), Some(main));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
