//! `ferry cluster evacuate|restore <member>` (`POST /1.0/cluster/members/<m>/state`):
//! mark the member evacuated and move every instance away (placement by free
//! memory, reserved through the replicated log), or clear the mark and bring
//! them back to their origin. Runs on the member itself; at most `parallel`
//! instances move at once, each with its own move operation, and one failing
//! instance does not stop the others. See doc/evacuation.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_db::{Command, InstanceRecord, MEMBER_EVACUATED, MEMBER_ONLINE};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::core::{ActionError, Daemon};
use crate::ops::{Op, Outcome};

mod child;
pub mod placement;
mod report;

use child::Child;
use placement::{MemberView, Need};
use report::{Entry, Report};

/// The volatile key naming the member an instance was evacuated from.
pub const ORIGIN_KEY: &str = "volatile.evacuate.origin";
/// The instance key that overrides the evacuation mode for one instance.
pub const EVACUATE_KEY: &str = "cluster.evacuate";
/// How long a placement reservation holds if its evacuation dies.
const RESERVATION_SECS: i64 = 1800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Evacuate,
    Restore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Auto,
    LiveMigrate,
    Migrate,
    Stop,
    /// Restore only: clear the mark, move nothing.
    Skip,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "" | "auto" => Mode::Auto,
            "live-migrate" => Mode::LiveMigrate,
            "migrate" => Mode::Migrate,
            "stop" => Mode::Stop,
            "skip" => Mode::Skip,
            _ => return None,
        })
    }
}

/// Parse the request's `action` and `mode`, naming the valid values.
pub fn parse_request(action: &str, mode: &str) -> Result<(Action, Mode), ActionError> {
    let action = match action {
        "evacuate" => Action::Evacuate,
        "restore" => Action::Restore,
        other => {
            return Err(ActionError::BadRequest(format!(
                "unknown member state action {other:?}: use \"evacuate\" or \"restore\""
            )))
        }
    };
    let parsed = Mode::parse(mode);
    match (action, parsed) {
        (Action::Evacuate, Some(m)) if m != Mode::Skip => Ok((action, m)),
        (Action::Restore, Some(m @ (Mode::Auto | Mode::Skip))) => Ok((action, m)),
        (Action::Evacuate, _) => Err(ActionError::BadRequest(format!(
            "unknown evacuation mode {mode:?}: use auto, live-migrate, migrate or stop"
        ))),
        (Action::Restore, _) => Err(ActionError::BadRequest(format!(
            "unknown restore mode {mode:?}: use auto (bring the instances back) or skip \
             (only clear the evacuated mark)"
        ))),
    }
}

/// Check the evacuation-related instance keys a user sets.
pub fn validate_config(config: &BTreeMap<String, String>) -> Result<(), ActionError> {
    if let Some(v) = config.get(EVACUATE_KEY) {
        if !matches!(v.as_str(), "auto" | "live-migrate" | "migrate" | "stop") {
            return Err(ActionError::BadRequest(format!(
                "{EVACUATE_KEY}={v:?}: use auto, live-migrate, migrate or stop"
            )));
        }
    }
    if let Some(v) = config.get("migration.stateful") {
        if !matches!(v.as_str(), "true" | "false") {
            return Err(ActionError::BadRequest(format!(
                "migration.stateful={v:?}: use true or false"
            )));
        }
    }
    Ok(())
}

/// What happens to one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// Live move of a running instance.
    Live,
    /// Stop, move, start (a running instance).
    Migrate,
    /// Move a stopped instance.
    Cold,
    /// Stop it in place.
    Stop,
    /// Start it in place (restore of an instance stopped in place).
    Start,
    Nothing,
}

impl How {
    fn name(self) -> &'static str {
        match self {
            How::Live => "live-migrate",
            How::Migrate => "migrate",
            How::Cold => "move",
            How::Stop => "stop",
            How::Start => "start",
            How::Nothing => "none",
        }
    }
}

/// The mode for one instance: its own `cluster.evacuate` wins unless `auto`.
fn effective_mode(rec: &InstanceRecord, mode: Mode) -> Mode {
    match rec.config.get(EVACUATE_KEY).map(String::as_str) {
        Some("live-migrate") => Mode::LiveMigrate,
        Some("migrate") => Mode::Migrate,
        Some("stop") => Mode::Stop,
        _ => mode,
    }
}

/// Evacuation: what to do with `rec` (running or not) under `mode`.
fn how_away(rec: &InstanceRecord, running: bool, mode: Mode) -> How {
    let stateful = rec.config.get("migration.stateful").map(String::as_str) != Some("false");
    match (effective_mode(rec, mode), running) {
        (Mode::Stop, true) => How::Stop,
        (Mode::Stop, false) => How::Nothing,
        (_, false) => How::Cold,
        (Mode::Migrate, true) => How::Migrate,
        (Mode::LiveMigrate, true) => How::Live,
        (_, true) if stateful => How::Live,
        (_, true) => How::Migrate,
    }
}

/// Restore: bring `rec` back to `origin` the way it left.
fn how_back(rec: &InstanceRecord, origin: &str) -> How {
    let running = rec.status == "Running";
    if rec.member == origin {
        return if running { How::Nothing } else { How::Start };
    }
    how_away(rec, running, Mode::Auto)
}

/// Evacuations and restores running on this member (one per member at a time).
#[derive(Default)]
pub struct Running(Arc<Mutex<HashMap<String, String>>>);

struct RunningGuard {
    member: String,
    map: Arc<Mutex<HashMap<String, String>>>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.map.lock().unwrap().remove(&self.member);
    }
}

impl Running {
    fn acquire(&self, member: &str, what: String) -> Result<RunningGuard, ActionError> {
        let mut map = self.0.lock().unwrap();
        if let Some(other) = map.get(member) {
            return Err(ActionError::Conflict(format!(
                "member \"{member}\" is already {other}: wait for it to finish \
                 (`ferry operation list`) or cancel it with `ferry operation cancel`"
            )));
        }
        map.insert(member.to_string(), what);
        Ok(RunningGuard {
            member: member.to_string(),
            map: self.0.clone(),
        })
    }

    fn describe(&self, member: &str, what: String) {
        if let Some(v) = self.0.lock().unwrap().get_mut(member) {
            *v = what;
        }
    }
}

/// One instance's work item.
struct Task {
    rec: InstanceRecord,
    how: How,
    need: Need,
}

impl Daemon {
    /// `POST /1.0/cluster/members/<member>/state` on the member itself.
    pub async fn member_state(
        self: &Arc<Self>,
        member: &str,
        action: &str,
        mode: &str,
    ) -> Result<Arc<Op>, ActionError> {
        let (action, mode) = parse_request(action, mode)?;
        let cluster = self.require_cluster()?;
        if member != self.member {
            return Err(ActionError::Internal(format!(
                "the request for member \"{member}\" reached {} instead",
                self.member
            )));
        }
        let verb = match action {
            Action::Evacuate => "being evacuated",
            Action::Restore => "being restored",
        };
        let guard = self.evacuations.acquire(member, verb.to_string())?;
        cluster
            .barrier()
            .await
            .map_err(|e| ActionError::Unavailable(format!("cannot read the cluster state: {e}")))?;
        let rec = cluster
            .db
            .get_member(member)?
            .ok_or_else(|| ActionError::NotFound(format!("member \"{member}\" not found")))?;
        let instances = cluster.db.list_instances()?;
        if action == Action::Restore
            && rec.state != MEMBER_EVACUATED
            && !instances.iter().any(|i| origin_of(i) == Some(member))
        {
            return Err(ActionError::Conflict(format!(
                "member \"{member}\" is not evacuated and no instance was evacuated from it: \
                 nothing to restore"
            )));
        }
        let desc = match action {
            Action::Evacuate => format!("Evacuating cluster member {member}"),
            Action::Restore => format!("Restoring cluster member {member}"),
        };
        let d = self.clone();
        let member = member.to_string();
        let op = self.ops.spawn(
            &desc,
            json!({"cluster_members": [format!("/1.0/cluster/members/{member}")]}),
            true,
            move |op| async move {
                let _guard = guard;
                let run = Run {
                    d,
                    op,
                    member,
                    action,
                    mode,
                    report: Default::default(),
                };
                run.run().await
            },
        );
        self.evacuations
            .describe(&rec.name, format!("{verb} by operation {}", op.id));
        Ok(op)
    }
}

fn origin_of(rec: &InstanceRecord) -> Option<&str> {
    rec.volatile.get(ORIGIN_KEY).map(String::as_str)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

struct Run {
    d: Arc<Daemon>,
    op: Arc<Op>,
    member: String,
    action: Action,
    mode: Mode,
    report: Arc<Mutex<Report>>,
}

impl Run {
    async fn run(self) -> Outcome {
        let parallel = self.d.settings.parallel();
        {
            let mut r = self.report.lock().unwrap();
            r.member = self.member.clone();
            r.action = self.action;
            r.mode = self.mode;
            r.parallel = parallel;
            r.bandwidth_per_move = self.bandwidth_per_move();
        }
        let state = match self.action {
            Action::Evacuate => MEMBER_EVACUATED,
            Action::Restore => MEMBER_ONLINE,
        };
        if let Err(e) = self
            .d
            .submit(Command::SetMemberState {
                name: self.member.clone(),
                state: state.into(),
            })
            .await
        {
            return Outcome::Failed(format!("cannot mark member {} {state}: {e}", self.member));
        }
        let tasks = match self.tasks().await {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(e),
        };
        self.report.lock().unwrap().total = tasks.len();
        self.publish();
        let run = Arc::new(self);
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
        let cancel = run.op.cancel_token();
        let mut set = tokio::task::JoinSet::new();
        // Permits and placements are taken here, in order (biggest first),
        // so the decisions do not depend on how the tasks get scheduled;
        // the moves then run concurrently.
        for task in tasks {
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            let Some(permit) = permit.filter(|_| !cancel.is_cancelled()) else {
                run.finish(
                    Entry::new(&task.rec, task.how.name(), "skipped")
                        .error("the evacuation was cancelled before this instance's turn"),
                );
                continue;
            };
            let dest = match task.how {
                How::Live | How::Migrate | How::Cold => Some(run.destination(&task).await),
                _ => None,
            };
            let (run, cancel) = (run.clone(), cancel.clone());
            set.spawn(async move {
                let _permit = permit;
                let entry = run.one(&task, dest, &cancel).await;
                run.finish(entry);
            });
        }
        while set.join_next().await.is_some() {}
        run.outcome(cancel.is_cancelled())
    }

    /// The instances to handle, biggest memory first (better packing).
    async fn tasks(&self) -> Result<Vec<Task>, String> {
        let cluster = self.d.require_cluster().map_err(|e| e.to_string())?;
        cluster
            .barrier()
            .await
            .map_err(|e| format!("cannot read the cluster state: {e}"))?;
        let all = cluster.db.list_instances().map_err(|e| e.to_string())?;
        let mut tasks = vec![];
        for rec in all {
            let how = match self.action {
                Action::Evacuate if rec.member == self.member => {
                    let spec = self.d.spec_for(&rec).map_err(|e| e.to_string())?;
                    let rt = self.d.runtime(&spec).await;
                    let need = Need {
                        memory: placement::memory_of(&rec, Some(rt.memory_usage.max(0) as u64)),
                        disk: if rec.storage_pool == crate::settings::SHARED_POOL {
                            0
                        } else {
                            crate::migrate::progress::tree_size(&spec.paths.volume)
                        },
                    };
                    tasks.push(Task {
                        how: how_away(&rec, rt.running, self.mode),
                        rec,
                        need,
                    });
                    continue;
                }
                Action::Restore
                    if self.mode != Mode::Skip && origin_of(&rec) == Some(&self.member) =>
                {
                    how_back(&rec, &self.member)
                }
                _ => continue,
            };
            let need = Need {
                memory: placement::memory_of(&rec, None),
                disk: 0,
            };
            tasks.push(Task { rec, how, need });
        }
        tasks.sort_by(|a, b| {
            b.need
                .memory
                .cmp(&a.need.memory)
                .then(a.rec.name.cmp(&b.rec.name))
        });
        Ok(tasks)
    }

    /// Handle one instance; never fails the whole run.
    async fn one(
        &self,
        task: &Task,
        dest: Option<Result<String, String>>,
        cancel: &CancellationToken,
    ) -> Entry {
        let started = Instant::now();
        let name = task.rec.name.clone();
        let res = match task.how {
            How::Nothing => match self.action {
                // Restore: it is home already; forget where it came from.
                Action::Restore => self
                    .set_origin(&name, None)
                    .await
                    .map(|_| Entry::new(&task.rec, "none", "unchanged")),
                Action::Evacuate => Ok(Entry::new(&task.rec, "none", "unchanged")),
            },
            How::Stop | How::Start => self.in_place(task, cancel).await,
            How::Live | How::Migrate | How::Cold => match dest {
                Some(Ok(target)) => self.relocate(task, target, cancel).await,
                Some(Err(e)) => Err(e),
                None => Err("internal error: a move without a destination".into()),
            },
        };
        let chosen = self.report.lock().unwrap().current.remove(&name);
        let mut entry = match res {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(instance = %name, error = %e, "evacuation step failed");
                let mut f = Entry::new(&task.rec, task.how.name(), "failed").error(e);
                f.to = chosen.map(|c| c.to).unwrap_or_default();
                f
            }
        };
        entry.total_ms = started.elapsed().as_millis() as u64;
        entry
    }

    /// Stop (evacuate --action stop) or start (its restore) on this member.
    async fn in_place(&self, task: &Task, cancel: &CancellationToken) -> Result<Entry, String> {
        let (action, status) = match task.how {
            How::Stop => ("stop", "stopped"),
            _ => ("start", "started"),
        };
        let req = crate::core::StateRequest {
            action: action.into(),
            stateful: false,
            force: false,
            timeout: 30,
        };
        let op = self
            .d
            .change_state(&task.rec.name, req)
            .await
            .map_err(|e| e.to_string())?;
        Child::Local(op).follow(&self.d, cancel, |_| {}).await?;
        let origin = match task.how {
            How::Stop => Some(self.member.clone()),
            _ => None,
        };
        self.set_origin(&task.rec.name, origin).await?;
        let mut e = Entry::new(&task.rec, task.how.name(), status);
        e.to = self.member.clone();
        Ok(e)
    }

    /// Move the instance away (evacuate) or back here (restore).
    /// Where the instance goes, its memory reserved there: the placement for
    /// an evacuation, this member for a restore.
    async fn destination(&self, task: &Task) -> Result<String, String> {
        match self.action {
            Action::Evacuate => self.place(task).await,
            Action::Restore => {
                self.reserve_here(task).await?;
                Ok(self.member.clone())
            }
        }
    }

    async fn relocate(
        &self,
        task: &Task,
        target: String,
        cancel: &CancellationToken,
    ) -> Result<Entry, String> {
        let rec = &task.rec;
        let mut entry = Entry::new(rec, task.how.name(), "moved");
        entry.to = target.clone();
        self.report
            .lock()
            .unwrap()
            .current
            .insert(rec.name.clone(), entry.current());
        self.publish();
        let res = self.move_and_follow(task, &target, cancel).await;
        let fin = match res {
            Ok(fin) => fin,
            Err(e) => {
                self.release(&rec.name).await;
                return Err(e);
            }
        };
        let meta = &fin["metadata"];
        entry.path = meta["path"].as_str().unwrap_or_default().to_string();
        entry.downtime_ms = meta["downtime_ms"].as_u64();
        let origin = match self.action {
            Action::Evacuate => Some(self.member.clone()),
            Action::Restore => None,
        };
        self.set_origin(&rec.name, origin).await?;
        Ok(entry)
    }

    /// Start the move (here for an evacuation, on the instance's member for
    /// a restore) and follow it to its end, mirroring its progress.
    async fn move_and_follow(
        &self,
        task: &Task,
        target: &str,
        cancel: &CancellationToken,
    ) -> Result<Value, String> {
        let rec = &task.rec;
        let live = task.how == How::Live;
        let bandwidth = self.bandwidth_per_move();
        let child = match self.action {
            Action::Evacuate => {
                let options = ferry_migration::MoveOptions {
                    bandwidth,
                    ..Default::default()
                };
                let op = self
                    .d
                    .move_instance(&rec.name, target, live, options)
                    .await
                    .map_err(|e| e.to_string())?;
                Child::Local(op)
            }
            Action::Restore => {
                let mut body = json!({"migration": true, "live": live});
                if let Some(b) = bandwidth {
                    body["bandwidth"] = json!(b);
                }
                Child::start_remote(
                    &self.d,
                    &rec.member,
                    &format!("/1.0/instances/{}?target={target}", rec.name),
                    body,
                )
                .await?
            }
        };
        let name = rec.name.clone();
        child
            .follow(&self.d, cancel, |j| {
                let meta = &j["metadata"];
                if let Some(c) = self.report.lock().unwrap().current.get_mut(&name) {
                    c.phase = meta["phase"].as_str().unwrap_or_default().to_string();
                    c.move_progress = meta["move_progress"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                }
                self.publish();
            })
            .await
    }

    /// The member's migration bandwidth, shared by the moves running at once.
    fn bandwidth_per_move(&self) -> Option<u64> {
        let s = &self.d.settings;
        s.migration_bandwidth
            .map(|b| (b / s.parallel() as u64).max(1))
    }

    /// Choose where an evacuated instance goes and reserve its memory there.
    async fn place(&self, task: &Task) -> Result<String, String> {
        let cluster = self.d.require_cluster().map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..5 {
            cluster
                .barrier()
                .await
                .map_err(|e| format!("cannot read the cluster state: {e}"))?;
            let db = &cluster.db;
            let members = db.list_members().map_err(|e| e.to_string())?;
            let instances = db.list_instances().map_err(|e| e.to_string())?;
            let now = unix_now();
            let reservations = db.placement_reservations(now).map_err(|e| e.to_string())?;
            let mut views = BTreeMap::new();
            for m in &members {
                let online =
                    m.name == self.member || cluster.check_online(&m.name, &m.address).await;
                let hb = cluster
                    .member_seen(&m.name)
                    .map(|(_, hb)| hb)
                    .unwrap_or_default();
                views.insert(
                    m.name.clone(),
                    MemberView {
                        online,
                        mem_free: hb.mem_free,
                        instance_memory: hb.instance_memory,
                        disk_free: hb.disk_free,
                    },
                );
            }
            let choice = placement::choose(
                &task.rec.name,
                &self.member,
                &task.need,
                &members,
                &views,
                &instances,
                &reservations,
            )?;
            match self
                .reserve(task, &choice.member, choice.capacity, now)
                .await
            {
                Ok(()) => return Ok(choice.member),
                // Another evacuation reserved that memory first: decide again.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Restore: check and reserve room for the instance on this member.
    async fn reserve_here(&self, task: &Task) -> Result<(), String> {
        let cluster = self.d.require_cluster().map_err(|e| e.to_string())?;
        let db = &cluster.db;
        let instances = db.list_instances().map_err(|e| e.to_string())?;
        let hb = crate::cluster::local_heartbeat(&self.member);
        let view = MemberView {
            online: true,
            mem_free: hb.mem_free,
            instance_memory: hb.instance_memory,
            disk_free: hb.disk_free,
        };
        let capacity = placement::free_memory(&self.member, &view, &instances);
        self.reserve(task, &self.member, capacity, unix_now()).await
    }

    async fn reserve(
        &self,
        task: &Task,
        member: &str,
        capacity: u64,
        now: i64,
    ) -> Result<(), String> {
        self.d
            .submit(Command::ReservePlacement {
                name: task.rec.name.clone(),
                member: member.to_string(),
                memory: task.need.memory,
                capacity,
                now,
                expires_at: now + RESERVATION_SECS,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Drop a failed move's reservation.
    async fn release(&self, name: &str) {
        let changes = ferry_db::PLACEMENT_KEYS
            .iter()
            .map(|k| (k.to_string(), None))
            .collect();
        if let Err(e) = self
            .d
            .submit(Command::UpdateVolatile {
                name: name.to_string(),
                changes,
            })
            .await
        {
            tracing::warn!(instance = %name, error = %e, "could not release a placement reservation (it expires by itself)");
        }
    }

    async fn set_origin(&self, name: &str, origin: Option<String>) -> Result<(), String> {
        self.d
            .submit(Command::UpdateVolatile {
                name: name.to_string(),
                changes: [(ORIGIN_KEY.to_string(), origin)].into(),
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("the instance moved, but recording its origin failed: {e}"))
    }

    fn finish(&self, entry: Entry) {
        self.report.lock().unwrap().finish(entry);
        self.publish();
    }

    fn publish(&self) {
        let (json, line) = {
            let r = self.report.lock().unwrap();
            (r.to_json(), r.progress_line())
        };
        self.op.set_meta("evacuation", json);
        self.op.set_meta("evacuation_progress", json!(line));
    }

    fn outcome(&self, cancelled: bool) -> Outcome {
        let r = self.report.lock().unwrap();
        let mut meta = Map::new();
        meta.insert("evacuation".into(), r.to_json());
        meta.insert("evacuation_progress".into(), json!(r.progress_line()));
        let verb = match self.action {
            Action::Evacuate => "evacuated",
            Action::Restore => "restored",
        };
        if cancelled {
            return Outcome::Cancelled(format!(
                "{} of {} cancelled: {}",
                self.op_kind(),
                self.member,
                r.summary()
            ));
        }
        let failed: Vec<String> = r
            .instances
            .iter()
            .filter(|e| e.status == "failed")
            .map(|e| format!("{}: {}", e.name, e.error))
            .collect();
        if failed.is_empty() {
            return Outcome::Done(meta);
        }
        Outcome::Failed(format!(
            "{} of {} instances could not be {verb} (they stay where they were): {}",
            failed.len(),
            r.total,
            failed.join("; ")
        ))
    }

    fn op_kind(&self) -> &'static str {
        match self.action {
            Action::Evacuate => "the evacuation",
            Action::Restore => "the restore",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, config: &[(&str, &str)], member: &str, status: &str) -> InstanceRecord {
        InstanceRecord {
            name: "i".into(),
            kind: kind.into(),
            member: member.into(),
            status: status.into(),
            storage_pool: "default".into(),
            image: String::new(),
            description: String::new(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volatile: Default::default(),
            created_at: String::new(),
            last_used_at: String::new(),
        }
    }

    #[test]
    fn requests_parse_and_bad_ones_name_the_valid_values() {
        assert_eq!(
            parse_request("evacuate", "").unwrap(),
            (Action::Evacuate, Mode::Auto)
        );
        assert_eq!(
            parse_request("evacuate", "live-migrate").unwrap().1,
            Mode::LiveMigrate
        );
        assert_eq!(parse_request("restore", "skip").unwrap().1, Mode::Skip);
        let e = parse_request("evacuate", "teleport")
            .unwrap_err()
            .to_string();
        assert!(e.contains("live-migrate, migrate or stop"), "{e}");
        assert!(parse_request("evacuate", "skip").is_err());
        assert!(parse_request("restore", "stop")
            .unwrap_err()
            .to_string()
            .contains("skip"));
        assert!(parse_request("freeze", "")
            .unwrap_err()
            .to_string()
            .contains("\"restore\""));
    }

    #[test]
    fn each_instance_gets_its_way_out_and_back() {
        let c = rec("container", &[], "m1", "Running");
        assert_eq!(how_away(&c, true, Mode::Auto), How::Live);
        assert_eq!(how_away(&c, false, Mode::Auto), How::Cold);
        assert_eq!(how_away(&c, true, Mode::Migrate), How::Migrate);
        assert_eq!(how_away(&c, true, Mode::Stop), How::Stop);
        assert_eq!(how_away(&c, false, Mode::Stop), How::Nothing);
        let not_live = rec(
            "virtual-machine",
            &[("migration.stateful", "false")],
            "m1",
            "Running",
        );
        assert_eq!(how_away(&not_live, true, Mode::Auto), How::Migrate);
        assert_eq!(how_away(&not_live, true, Mode::LiveMigrate), How::Live);
        // The instance's own key wins over the request's mode.
        let pinned = rec("container", &[(EVACUATE_KEY, "stop")], "m1", "Running");
        assert_eq!(how_away(&pinned, true, Mode::LiveMigrate), How::Stop);
        let auto = rec("container", &[(EVACUATE_KEY, "auto")], "m1", "Running");
        assert_eq!(how_away(&auto, true, Mode::Migrate), How::Migrate);
        // Back: moved ones come back live; stopped-in-place ones start.
        assert_eq!(
            how_back(&rec("container", &[], "m2", "Running"), "m1"),
            How::Live
        );
        assert_eq!(
            how_back(&rec("container", &[], "m1", "Stopped"), "m1"),
            How::Start
        );
        assert_eq!(
            how_back(&rec("container", &[], "m2", "Stopped"), "m1"),
            How::Cold
        );
    }

    #[test]
    fn config_keys_are_checked() {
        let ok: BTreeMap<_, _> = [(EVACUATE_KEY.to_string(), "migrate".to_string())].into();
        validate_config(&ok).unwrap();
        let bad: BTreeMap<_, _> = [(EVACUATE_KEY.to_string(), "later".to_string())].into();
        assert!(validate_config(&bad)
            .unwrap_err()
            .to_string()
            .contains("live-migrate"));
        let bad: BTreeMap<_, _> = [("migration.stateful".to_string(), "yes".to_string())].into();
        assert!(validate_config(&bad).is_err());
    }
}
