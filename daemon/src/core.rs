//! The daemon's core: state shared by all requests, and the instance actions.
//!
//! Actions validate everything before they change anything, so a refused
//! request leaves the DB and the disk untouched. Each accepted action holds the
//! instance's lease (see [`Leases`]) for the whole life of its operation, so no
//! other lifecycle call can race it; the lease ends with the operation.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_db::{Command, Db, InstanceRecord, Writer};
use ferry_drivers::{
    Driver, InstancePaths, InstanceSpec, InstanceType, Lifecycle, OpCtx, RuntimeState, StateSave,
    VolatileChanges,
};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::events::EventBus;
use crate::ops::{Op, Operations, Outcome};

/// Why an action was refused or failed. The API layer maps kinds to HTTP codes.
#[derive(Debug, Error)]
pub enum ActionError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ferry_db::DbError> for ActionError {
    fn from(e: ferry_db::DbError) -> Self {
        match e {
            ferry_db::DbError::NotFound { .. } => ActionError::NotFound(e.to_string()),
            ferry_db::DbError::AlreadyExists { .. } | ferry_db::DbError::Conflict(_) => {
                ActionError::Conflict(e.to_string())
            }
            ferry_db::DbError::Unavailable(m) => ActionError::Unavailable(m),
            other => ActionError::Internal(format!("database: {other}")),
        }
    }
}

pub struct Daemon {
    pub tls: crate::tls::TlsState,
    pub dir: PathBuf,
    pub member: String,
    /// HTTPS address (also this member's cluster address).
    pub listen: Option<std::net::SocketAddr>,
    db: std::sync::RwLock<Arc<Db>>,
    writer: Writer,
    cluster: std::sync::RwLock<Option<Arc<crate::cluster::Cluster>>>,
    pub ops: Operations,
    pub events: EventBus,
    pub pending: crate::migrate::Pending,
    /// exec's stdio websockets, by operation and secret.
    pub exec_pending: crate::migrate::Pending<axum::extract::ws::WebSocket>,
    leases: Leases,
    /// Evacuations and restores running on this member, by member name.
    pub evacuations: crate::evacuate::Running,
    pub settings: crate::settings::Settings,
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl Daemon {
    pub async fn open(
        dir: PathBuf,
        member: String,
        listen: Option<std::net::SocketAddr>,
        settings: crate::settings::Settings,
    ) -> anyhow::Result<Arc<Daemon>> {
        for sub in [
            "",
            "run",
            "logs",
            "images",
            "trust",
            "storage-pools/default",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let db = Arc::new(Db::open(&dir.join("ferry.db"))?);
        let events = EventBus::with_location(member.clone());
        let trust = ferry_cluster::TrustStore::new(dir.join("trust")).with_db(db.clone());
        let mode = match ferry_cluster::ClusterCert::load(&dir)? {
            Some(c) => crate::tls::TlsMode::Cluster(c),
            None => crate::tls::TlsMode::Standalone(ferry_cluster::Identity::load_or_generate(
                &dir.join("server.crt"),
                &dir.join("server.key"),
                &member,
                &[member.clone(), "localhost".into()],
            )?),
        };
        crate::cluster::set_local_resources(
            settings.instance_memory,
            dir.join("storage-pools/default"),
        );
        let d = Arc::new(Daemon {
            tls: crate::tls::TlsState::new(mode, trust)?,
            listen,
            cluster: std::sync::RwLock::new(None),
            writer: Writer::Local(db.clone()),
            ops: Operations::new(events.clone(), member.clone()),
            events,
            db: std::sync::RwLock::new(db),
            dir,
            member,
            leases: Leases::default(),
            evacuations: Default::default(),
            pending: Default::default(),
            exec_pending: Default::default(),
            settings,
        });
        if let (Some(cfg), Some(cert)) = (
            crate::cluster::ClusterConfig::load(&d.dir),
            ferry_cluster::ClusterCert::load(&d.dir)?,
        ) {
            anyhow::ensure!(
                cfg.name == d.member,
                "this member joined its cluster as \"{}\": start ferryd with --name {}",
                cfg.name,
                cfg.name
            );
            d.start_cluster(cfg, cert).await?;
            tracing::info!("clustered: raft node started");
            d.recover_unfinished_moves().await;
        }
        tokio::spawn(ferry_drivers::warm_up());
        Ok(d)
    }

    /// Take an instance's exclusive lease for a lifecycle action.
    pub fn leases_acquire(&self, name: &str, what: &str) -> Result<Lease, ActionError> {
        self.leases.acquire(name, what)
    }

    /// The DB holding instance records (the replicated one once clustered).
    pub fn db(&self) -> Arc<Db> {
        self.db.read().unwrap().clone()
    }

    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.cluster.read().unwrap().clone()
    }

    pub fn set_cluster(&self, c: Arc<crate::cluster::Cluster>) {
        *self.db.write().unwrap() = c.db.clone();
        *self.cluster.write().unwrap() = Some(c);
    }

    /// The write path: local apply, or raft commit once clustered.
    pub async fn submit(&self, cmd: Command) -> Result<u64, ferry_db::DbError> {
        match self.cluster() {
            Some(c) => c.write(cmd).await,
            None => self.writer.submit(cmd).await,
        }
    }

    fn paths(&self, name: &str, kind: InstanceType, pool: &str) -> InstancePaths {
        let kind_dir = match kind {
            InstanceType::Container => "containers",
            InstanceType::VirtualMachine => "virtual-machines",
        };
        let pool_dir = match (&self.settings.shared_pool, pool) {
            (Some(p), crate::settings::SHARED_POOL) => p.clone(),
            _ => self.dir.join("storage-pools").join(pool),
        };
        InstancePaths {
            volume: pool_dir.join(kind_dir).join(name),
            run: self.dir.join("run").join(name),
            logs: self.dir.join("logs").join(name),
            images: self.dir.join("images"),
        }
    }

    pub fn spec_for(&self, rec: &InstanceRecord) -> Result<InstanceSpec, ActionError> {
        let kind = InstanceType::parse(&rec.kind).ok_or_else(|| {
            ActionError::Internal(format!(
                "instance {} has unknown type {:?}",
                rec.name, rec.kind
            ))
        })?;
        Ok(InstanceSpec {
            name: rec.name.clone(),
            kind,
            image: rec.image.clone(),
            config: rec.config.clone(),
            volatile: rec.volatile.clone(),
            paths: self.paths(&rec.name, kind, &rec.storage_pool),
        })
    }

    pub fn record(&self, name: &str) -> Result<InstanceRecord, ActionError> {
        self.db()
            .get_instance(name)?
            .ok_or_else(|| ActionError::NotFound(format!("Instance \"{name}\" not found")))
    }

    /// Live runtime state; a driver error is reported as not running.
    pub async fn runtime(&self, spec: &InstanceSpec) -> RuntimeState {
        match Driver::for_type(spec.kind).state(spec).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(instance = %spec.name, error = %e, "cannot read instance state");
                RuntimeState::default()
            }
        }
    }

    /// Incus-shaped Instance (and InstanceFull with `full`).
    pub async fn instance_json(&self, rec: &InstanceRecord, full: bool) -> Value {
        let spec = match self.spec_for(rec) {
            Ok(s) => s,
            Err(e) => {
                return json!({"name": rec.name, "status": "Error", "status_code": 112, "description": e.to_string()})
            }
        };
        // An instance on another member: its state is known there; show the
        // last status it recorded (a direct GET is forwarded to its member).
        let remote = rec.member != self.member;
        let rt = if remote {
            RuntimeState {
                running: rec.status == "Running",
                ..Default::default()
            }
        } else {
            self.runtime(&spec).await
        };
        let stateful = !remote && Driver::for_type(spec.kind).has_saved_state(&spec);
        let (status, code) = if rec.status == "Error" {
            // e.g. a VM lost when its post-copy move broke: say so until
            // the user deletes or restarts it.
            ("Error", 112)
        } else if rt.running {
            ("Running", 103)
        } else {
            ("Stopped", 102)
        };
        let mut fields = crate::instance_put::writable(rec);
        let expanded = json!({
            "name": rec.name, "type": rec.kind, "status": status, "status_code": code,
            "location": rec.member, "created_at": rec.created_at, "last_used_at": rec.last_used_at,
            "stateful": stateful, "project": "default", "expanded_config": fields["config"],
            "expanded_devices": {"root": {"type": "disk", "path": "/", "pool": rec.storage_pool}},
        });
        if let Value::Object(more) = expanded {
            fields.extend(more);
        }
        let mut v = Value::Object(fields);
        if full {
            v["state"] = state_json(&rt);
            v["snapshots"] = json!([]);
            v["backups"] = json!([]);
        }
        v
    }

    pub async fn instance_state_json(&self, name: &str) -> Result<Value, ActionError> {
        let rec = self.record(name)?;
        let spec = self.spec_for(&rec)?;
        Ok(state_json(&self.runtime(&spec).await))
    }

    fn op_ctx(op: &Arc<Op>) -> OpCtx {
        let op2 = op.clone();
        OpCtx::new(move |k, v| op2.set_meta(k, json!(v)), op.cancel_token())
    }

    async fn store_volatile(
        &self,
        name: &str,
        changes: VolatileChanges,
    ) -> Result<(), ferry_db::DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.submit(Command::UpdateVolatile {
            name: name.into(),
            changes,
        })
        .await
        .map(|_| ())
    }

    async fn set_status(&self, name: &str, status: &str) -> Result<(), ferry_db::DbError> {
        let now = now_rfc3339();
        let used = (status == "Running").then_some(now);
        self.submit(Command::SetInstanceStatus {
            name: name.into(),
            status: status.into(),
            last_used_at: used,
        })
        .await
        .map(|_| ())
    }
}

fn state_json(rt: &RuntimeState) -> Value {
    let (status, code) = if rt.running {
        ("Running", 103)
    } else {
        ("Stopped", 102)
    };
    json!({
        "status": status, "status_code": code, "pid": rt.pid, "processes": rt.processes,
        "cpu": {"usage": 0},
        "memory": {"usage": rt.memory_usage, "usage_peak": 0, "total": 0, "swap_usage": 0, "swap_usage_peak": 0},
        "disk": {}, "network": null, "os_info": null,
    })
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Incus's rule: 1-63 letters, digits and dashes; starts with a letter; no trailing dash.
pub fn validate_name(name: &str) -> Result<(), ActionError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ActionError::BadRequest(format!(
            "Instance name {name:?} is invalid: use 1-63 letters, digits and dashes, starting with a letter and not ending with a dash"
        )))
    }
}

/// Member names follow the instance name rule.
pub fn validate_member_name(name: &str) -> Result<(), ActionError> {
    validate_name(name).map_err(|_| {
        ActionError::BadRequest(format!(
            "Member name {name:?} is invalid: use 1-63 letters, digits and dashes, starting with a letter and not ending with a dash"
        ))
    })
}

/// Exclusive per-instance leases: one lifecycle operation at a time.
#[derive(Default)]
struct Leases {
    held: Arc<Mutex<HashMap<String, String>>>,
}

/// Releases the lease when dropped (the operation ended, whatever the outcome).
pub struct Lease {
    name: String,
    held: Arc<Mutex<HashMap<String, String>>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.lock().unwrap().remove(&self.name);
    }
}

impl Leases {
    fn acquire(&self, name: &str, what: &str) -> Result<Lease, ActionError> {
        let mut held = self.held.lock().unwrap();
        if let Some(other) = held.get(name) {
            return Err(ActionError::Conflict(format!(
                "Instance \"{name}\" is busy: {other}; wait for it to finish or cancel it with `ferry operation cancel`"
            )));
        }
        held.insert(name.to_string(), what.to_string());
        Ok(Lease {
            name: name.to_string(),
            held: self.held.clone(),
        })
    }
}

/// Body of `POST /1.0/instances`. Fields ferry does not use yet are accepted
/// (and ignored) so that Incus clients' requests parse.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub start: bool,
    #[serde(default)]
    pub devices: Value,
    #[serde(default)]
    pub profiles: Value,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub instance_type: String,
    #[serde(default)]
    pub stateful: bool,
}

#[allow(dead_code)]
#[derive(Debug, Default, serde::Deserialize)]
pub struct Source {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub alias: String,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Body of `PUT /1.0/instances/<name>/state`. `timeout` is accepted for Incus
/// compatibility; drivers apply their own bounded timeouts.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
pub struct StateRequest {
    pub action: String,
    #[serde(default)]
    pub stateful: bool,
    #[serde(default)]
    pub force: bool,
    #[serde(default = "default_timeout")]
    pub timeout: i64,
}

fn default_timeout() -> i64 {
    30
}

/// Body of `POST /1.0/instances/<name>/exec`. Output is always recorded.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(rename = "wait-for-websocket", default)]
    pub wait_for_websocket: bool,
    #[serde(rename = "record-output", default)]
    pub record_output: bool,
    #[serde(default)]
    pub interactive: bool,
    /// Terminal size of an interactive command.
    #[serde(default)]
    pub width: u16,
    #[serde(default)]
    pub height: u16,
}

fn resources(name: &str) -> Value {
    json!({"instances": [format!("/1.0/instances/{name}")]})
}

fn outcome_of(e: ferry_drivers::DriverError, what: &str) -> Outcome {
    match e {
        ferry_drivers::DriverError::Cancelled(m) => {
            Outcome::Cancelled(format!("{what} cancelled: {m}"))
        }
        other => Outcome::Failed(format!("{what} failed: {other}")),
    }
}

impl Daemon {
    pub fn create_instance(self: &Arc<Self>, req: CreateRequest) -> Result<Arc<Op>, ActionError> {
        validate_name(&req.name)?;
        let kind = InstanceType::parse(&req.kind).ok_or_else(|| {
            ActionError::BadRequest(format!(
                "Unknown instance type {:?}: use \"container\" or \"virtual-machine\"",
                req.kind
            ))
        })?;
        if !matches!(req.source.kind.as_str(), "" | "image") {
            return Err(ActionError::BadRequest(format!(
                "Unsupported source type {:?}: only \"image\" sources are supported",
                req.source.kind
            )));
        }
        let image = if req.source.alias.is_empty() {
            match kind {
                InstanceType::Container => "busybox".to_string(),
                InstanceType::VirtualMachine => "testvm".to_string(),
            }
        } else {
            req.source.alias.clone()
        };
        if let Some(k) = req.config.keys().find(|k| k.starts_with("volatile.")) {
            return Err(ActionError::BadRequest(format!(
                "Config key {k:?} is volatile and set by ferry: remove it"
            )));
        }
        let pool = self.pool_of(&req.devices)?;
        let now = now_rfc3339();
        let rec = InstanceRecord {
            name: req.name.clone(),
            kind: kind.as_str().into(),
            member: self.member.clone(),
            status: "Stopped".into(),
            storage_pool: pool,
            image,
            description: req.description.clone(),
            config: req.config.clone(),
            volatile: BTreeMap::new(),
            created_at: now.clone(),
            last_used_at: now,
        };
        let spec = self.spec_for(&rec)?;
        let driver = Driver::for_type(kind);
        driver
            .validate(&spec)
            .map_err(|e| ActionError::BadRequest(e.to_string()))?;
        crate::evacuate::validate_config(&rec.config)?;
        if self.db().get_instance(&req.name)?.is_some() {
            return Err(ActionError::Conflict(format!(
                "Instance \"{}\" already exists",
                req.name
            )));
        }
        let lease = self.leases.acquire(&req.name, "it is being created")?;
        let (d, start) = (self.clone(), req.start);
        Ok(self.ops.spawn(
            "Creating instance",
            resources(&req.name),
            true,
            move |op| async move {
                let _lease = lease;
                d.run_create(op, rec, spec, driver, start).await
            },
        ))
    }

    /// The storage pool of a new instance: its root disk device's `pool`.
    fn pool_of(&self, devices: &Value) -> Result<String, ActionError> {
        let pool = match devices.get("root").and_then(|r| r.get("pool")) {
            None | Some(Value::Null) => return Ok("default".into()),
            Some(Value::String(p)) => p.clone(),
            Some(other) => {
                return Err(ActionError::BadRequest(format!(
                    "devices.root.pool must be a pool name, not {other}"
                )))
            }
        };
        match pool.as_str() {
            "default" => Ok(pool),
            crate::settings::SHARED_POOL if self.settings.shared_pool.is_some() => Ok(pool),
            crate::settings::SHARED_POOL => Err(ActionError::BadRequest(format!(
                "Storage pool \"shared\" is not configured on member \"{}\": start its ferryd with --shared-pool PATH",
                self.member
            ))),
            _ => Err(ActionError::BadRequest(format!(
                "Storage pool {pool:?} not found: use \"default\" or \"shared\""
            ))),
        }
    }

    async fn run_create(
        &self,
        op: Arc<Op>,
        rec: InstanceRecord,
        spec: InstanceSpec,
        driver: Driver,
        start: bool,
    ) -> Outcome {
        let ctx = Self::op_ctx(&op);
        let name = rec.name.clone();
        if let Err(e) = self.submit(Command::CreateInstance { record: rec }).await {
            return Outcome::Failed(format!("cannot record instance: {e}"));
        }
        let created = driver.create(&spec, &ctx).await;
        let vol = match created {
            Ok(v) => v,
            Err(e) => {
                if let Err(de) = driver.delete(&spec).await {
                    tracing::warn!(instance = %name, error = %de, "cleanup after failed create");
                }
                let _ = self
                    .submit(Command::DeleteInstance { name: name.clone() })
                    .await;
                return outcome_of(e, "Creating the instance");
            }
        };
        if let Err(e) = self.store_volatile(&name, vol).await {
            return Outcome::Failed(format!("cannot record instance state: {e}"));
        }
        self.events.send_lifecycle("instance-created", &name);
        if !start {
            return Outcome::Done(Map::new());
        }
        op.set_cancellable(false);
        let spec = match self.record(&name).and_then(|r| self.spec_for(&r)) {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        match self.do_start(&spec, &driver, &ctx).await {
            Ok(()) => Outcome::Done(Map::new()),
            Err(o) => o,
        }
    }

    async fn do_start(
        &self,
        spec: &InstanceSpec,
        driver: &Driver,
        ctx: &OpCtx,
    ) -> Result<(), Outcome> {
        let res = if driver.has_saved_state(spec) {
            driver.restore_state(spec, ctx).await
        } else {
            driver.start(spec, ctx).await
        };
        let vol = res.map_err(|e| outcome_of(e, "Starting the instance"))?;
        self.store_volatile(&spec.name, vol)
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        self.set_status(&spec.name, "Running")
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        self.events.send_lifecycle("instance-started", &spec.name);
        Ok(())
    }

    async fn do_stop(
        &self,
        spec: &InstanceSpec,
        driver: &Driver,
        stateful: bool,
        force: bool,
        ctx: &OpCtx,
    ) -> Result<(), Outcome> {
        let res = if stateful {
            driver.save_state(spec, ctx).await
        } else {
            driver.stop(spec, force, ctx).await
        };
        let vol = res.map_err(|e| outcome_of(e, "Stopping the instance"))?;
        self.store_volatile(&spec.name, vol)
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        self.set_status(&spec.name, "Stopped")
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        self.events.send_lifecycle("instance-stopped", &spec.name);
        Ok(())
    }

    pub async fn change_state(
        self: &Arc<Self>,
        name: &str,
        req: StateRequest,
    ) -> Result<Arc<Op>, ActionError> {
        let rec = self.record(name)?;
        let spec = self.spec_for(&rec)?;
        let driver = Driver::for_type(spec.kind);
        let desc = match req.action.as_str() {
            "start" => "Starting instance",
            "stop" => "Stopping instance",
            "restart" => "Restarting instance",
            other => {
                return Err(ActionError::BadRequest(format!(
                    "Unknown action {other:?}: use \"start\", \"stop\" or \"restart\""
                )))
            }
        };
        let lease = self
            .leases
            .acquire(name, &format!("{} is in progress", desc.to_lowercase()))?;
        let running = self.runtime(&spec).await.running;
        match (req.action.as_str(), running) {
            ("start", true) => {
                return Err(ActionError::BadRequest(format!(
                    "Instance \"{name}\" is already running"
                )))
            }
            ("stop" | "restart", false) => {
                return Err(ActionError::BadRequest(format!(
                    "Instance \"{name}\" is not running: nothing to {}",
                    req.action
                )))
            }
            _ => {}
        }
        if req.stateful && req.action == "restart" {
            return Err(ActionError::BadRequest(
                "A restart cannot be stateful: use stop --stateful, then start".into(),
            ));
        }
        if req.stateful && req.action == "start" && !driver.has_saved_state(&spec) {
            return Err(ActionError::BadRequest(format!(
                "Instance \"{name}\" has no saved state to start from: start it without --stateful"
            )));
        }
        let d = self.clone();
        Ok(self
            .ops
            .spawn(desc, resources(name), true, move |op| async move {
                let _lease = lease;
                let ctx = Self::op_ctx(&op);
                let res = match req.action.as_str() {
                    "start" => d.do_start(&spec, &driver, &ctx).await,
                    "stop" => {
                        d.do_stop(&spec, &driver, req.stateful, req.force, &ctx)
                            .await
                    }
                    _ => match d.do_stop(&spec, &driver, false, req.force, &ctx).await {
                        Ok(()) => d.do_start(&spec, &driver, &ctx).await,
                        Err(o) => Err(o),
                    },
                };
                match res {
                    Ok(()) => Outcome::Done(Map::new()),
                    Err(o) => o,
                }
            }))
    }

    pub async fn delete_instance(self: &Arc<Self>, name: &str) -> Result<Arc<Op>, ActionError> {
        let rec = self.record(name)?;
        let spec = self.spec_for(&rec)?;
        let lease = self.leases.acquire(name, "it is being deleted")?;
        if self.runtime(&spec).await.running {
            return Err(ActionError::BadRequest(format!(
                "Instance \"{name}\" is running: stop it first (`ferry stop {name}`) or use `ferry delete --force {name}`"
            )));
        }
        let d = self.clone();
        let name = name.to_string();
        Ok(self.ops.spawn(
            "Deleting instance",
            resources(&name),
            false,
            move |_op| async move {
                let _lease = lease;
                if let Err(e) = Driver::for_type(spec.kind).delete(&spec).await {
                    return Outcome::Failed(format!("Deleting the instance's files failed: {e}"));
                }
                if let Err(e) = d
                    .submit(Command::DeleteInstance { name: name.clone() })
                    .await
                {
                    return Outcome::Failed(format!("Deleting the instance record failed: {e}"));
                }
                d.events.send_lifecycle("instance-deleted", &name);
                Outcome::Done(Map::new())
            },
        ))
    }

    pub async fn exec(
        self: &Arc<Self>,
        name: &str,
        req: ExecRequest,
    ) -> Result<Arc<Op>, ActionError> {
        let rec = self.record(name)?;
        let spec = self.spec_for(&rec)?;
        let Driver::Container(driver) = Driver::for_type(spec.kind) else {
            return Err(ActionError::BadRequest(format!(
                "Instance \"{name}\" is a virtual machine: exec runs in containers only; see its serial output with `ferry console --show-log {name}`"
            )));
        };
        if req.command.is_empty() {
            return Err(ActionError::BadRequest(
                "\"command\" is empty: give the program to run and its arguments".into(),
            ));
        }
        if req.interactive && !req.wait_for_websocket {
            return Err(ActionError::BadRequest(
                "an interactive exec needs \"wait-for-websocket\": true (its terminal is a websocket)"
                    .into(),
            ));
        }
        if !self.runtime(&spec).await.running {
            return Err(ActionError::BadRequest(format!(
                "Instance \"{name}\" is not running: start it first"
            )));
        }
        if req.wait_for_websocket {
            return Ok(self.exec_websockets(name, spec, driver, req));
        }
        let name = name.to_string();
        Ok(self.ops.spawn(
            "Executing command",
            resources(&name),
            false,
            move |op| async move {
                let logs = spec.paths.logs.clone();
                let files = ["stdout", "stderr"].map(|s| logs.join(format!("exec_{}.{s}", op.id)));
                let open = |p: &PathBuf| {
                    std::fs::create_dir_all(&logs).and_then(|_| std::fs::File::create(p))
                };
                let (out, err) = match (open(&files[0]), open(&files[1])) {
                    (Ok(o), Ok(e)) => (o, e),
                    (Err(e), _) | (_, Err(e)) => {
                        return Outcome::Failed(format!("cannot create exec output files: {e}"))
                    }
                };
                match driver
                    .exec(&spec, &req.command, &req.environment, out, err)
                    .await
                {
                    Ok(code) => {
                        let mut m = Map::new();
                        m.insert("return".into(), json!(code));
                        let url = |i: usize| {
                            format!(
                                "/1.0/instances/{name}/logs/exec_{}.{}",
                                op.id,
                                ["stdout", "stderr"][i]
                            )
                        };
                        m.insert("output".into(), json!({"1": url(0), "2": url(1)}));
                        Outcome::Done(m)
                    }
                    Err(e) => outcome_of(e, "exec"),
                }
            },
        ))
    }

    /// `PATCH /1.0/instances/<name>`: merge config keys (an empty value unsets
    /// the key). Validated by the driver first; one replicated write.
    pub async fn patch_config(
        &self,
        name: &str,
        changes: BTreeMap<String, String>,
    ) -> Result<(), ActionError> {
        if let Some(k) = changes.keys().find(|k| k.starts_with("volatile.")) {
            return Err(ActionError::BadRequest(format!(
                "Config key {k:?} is volatile and set by ferry: remove it"
            )));
        }
        self.change_config(name, None, |_| Ok(changes)).await
    }

    /// `PUT /1.0/instances/<name>` (`incus config set/unset/edit`): replace the
    /// writable fields, checking `If-Match` against the instance's ETag. The
    /// change is made before the operation is returned (which is then done).
    pub async fn put_instance(
        &self,
        name: &str,
        put: crate::instance_put::InstancePut,
        if_match: Option<&str>,
    ) -> Result<Arc<Op>, ActionError> {
        self.change_config(name, if_match, |rec| crate::instance_put::changes(rec, put))
            .await?;
        Ok(self
            .ops
            .spawn("Updating instance", resources(name), false, |_| async {
                Outcome::Done(Map::new())
            }))
    }

    /// One config change under the instance's lease: `make` turns the record
    /// (read under the lease, after the `If-Match` check) into the key
    /// changes; a running container's limits follow at once.
    async fn change_config(
        &self,
        name: &str,
        if_match: Option<&str>,
        make: impl FnOnce(&InstanceRecord) -> Result<BTreeMap<String, String>, ActionError>,
    ) -> Result<(), ActionError> {
        let _lease = self
            .leases
            .acquire(name, "its configuration is being changed")?;
        let rec = self.record(name)?;
        crate::instance_put::check_if_match(&rec, if_match)?;
        let changes = make(&rec)?;
        if changes.is_empty() {
            return Ok(());
        }
        let mut config = rec.config.clone();
        let limits = changes.keys().any(|k| k.starts_with("limits."));
        for (k, v) in changes {
            if v.is_empty() {
                config.remove(&k);
            } else {
                config.insert(k, v);
            }
        }
        let old = self.spec_for(&rec)?;
        let spec = self.spec_for(&InstanceRecord {
            config: config.clone(),
            ..rec
        })?;
        Driver::for_type(spec.kind)
            .validate(&spec)
            .map_err(|e| ActionError::BadRequest(e.to_string()))?;
        crate::evacuate::validate_config(&spec.config)?;
        // A running container gets new limits at once (the request was
        // forwarded to its member); a VM's at its next cold start.
        let live = match Driver::for_type(spec.kind) {
            Driver::Container(c) if limits => Some(c),
            _ => None,
        };
        if let Some(c) = &live {
            c.apply_limits(&spec)
                .map_err(|e| ActionError::BadRequest(e.to_string()))?;
        }
        let written = self
            .submit(Command::SetInstanceConfig {
                name: name.to_string(),
                config,
            })
            .await;
        if let (Err(_), Some(c)) = (&written, &live) {
            if let Err(e) = c.apply_limits(&old) {
                tracing::warn!(instance = name, error = %e, "putting the old limits back after a refused config write");
            }
        }
        written?;
        Ok(())
    }

    /// Path of a log file of an instance; refuses names that could escape the log dir.
    pub fn log_path(&self, name: &str, file: &str) -> Result<PathBuf, ActionError> {
        let rec = self.record(name)?;
        let spec = self.spec_for(&rec)?;
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(ActionError::BadRequest(format!(
                "Invalid log file name {file:?}"
            )));
        }
        Ok(spec.paths.logs.join(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["c1", "a", "web-01", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "1abc",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a b",
            &"a".repeat(64),
            "../x",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn lease_is_exclusive_and_released_on_drop() {
        let l = Leases::default();
        let a = l.acquire("c1", "it is being stopped").unwrap();
        let e = l.acquire("c1", "x").err().unwrap().to_string();
        assert!(e.contains("busy") && e.contains("being stopped"), "{e}");
        l.acquire("c2", "x").unwrap();
        drop(a);
        l.acquire("c1", "x").unwrap();
    }
}
