//! Clustering: a raft node per member over member-to-member mTLS, join by
//! one-time token, heartbeats, and the replicated write path.
//!
//! Writes go through [`Cluster::write`]: `client_write` on the leader; a
//! follower forwards the typed command to the leader (`/internal/raft/write`)
//! and returns once it is committed and applied there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_cluster::raft::{self, ApplyResult, NodeId, Raft};
use ferry_cluster::ClusterCert;
use ferry_db::{Command, Db, DbError, LogCommand};
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod actions;
pub mod net;
pub mod peer;

use peer::PeerClient;

/// The one endpoint an anonymous (certificate-less) peer may call: a joiner
/// presenting its one-time token.
pub const JOIN_PATH: &str = "/internal/cluster/join";
pub const WRITE_PATH: &str = "/internal/raft/write";
pub const BARRIER_PATH: &str = "/internal/raft/barrier";
pub const HEARTBEAT_PATH: &str = "/internal/heartbeat";
/// A write that cannot be committed within this time fails (no quorum).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A member not heard from for this long is shown offline.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(4);

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("{0}")]
    Refused(String),
    #[error("cluster certificate: {0}")]
    Cert(#[from] ferry_cluster::CertError),
    #[error("cluster TLS: {0}")]
    Tls(#[from] ferry_cluster::mtls::MtlsError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Peer(#[from] peer::PeerError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `DIR/cluster.json`: who this member is in its cluster (format version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub version: u32,
    pub name: String,
    pub node_id: NodeId,
    pub address: String,
}

impl ClusterConfig {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("cluster.json")
    }
    pub fn load(dir: &Path) -> Option<ClusterConfig> {
        let text = std::fs::read_to_string(Self::path(dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
    pub fn save(&self, dir: &Path) -> Result<(), ClusterError> {
        let path = Self::path(dir);
        let tmp = dir.join("cluster.json.tmp");
        let io = |source| ClusterError::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

/// The leader's answer to a forwarded write: the outcome and its log index.
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardedWrite {
    pub result: ApplyResult,
    pub log_index: u64,
}

/// What a member tells others in its heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    pub name: String,
    pub version: String,
    pub mem_free: u64,
    /// Memory the member offers to instances (`--instance-memory`); 0 = no cap.
    #[serde(default)]
    pub instance_memory: u64,
    /// Free bytes on the member's storage (its data dir's file system).
    #[serde(default)]
    pub disk_free: u64,
}

/// This member's resources as its heartbeat reports them (set once at start).
struct LocalResources {
    instance_memory: u64,
    storage: std::path::PathBuf,
}

static LOCAL_RESOURCES: std::sync::OnceLock<LocalResources> = std::sync::OnceLock::new();

/// Record what this member's heartbeats report beyond the host's memory.
pub fn set_local_resources(instance_memory: Option<u64>, storage: std::path::PathBuf) {
    let _ = LOCAL_RESOURCES.set(LocalResources {
        instance_memory: instance_memory.unwrap_or(0),
        storage,
    });
}

/// Free bytes on the file system holding `path` (0 if it cannot be read).
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between targets
pub fn disk_free(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available() as u64 * s.fragment_size() as u64)
        .unwrap_or(0)
}

pub struct Cluster {
    pub config: ClusterConfig,
    pub raft: Raft,
    pub db: Arc<Db>,
    pub peers: PeerClient,
    pub cert: ClusterCert,
    seen: Mutex<HashMap<String, (Instant, Heartbeat)>>,
}

fn raft_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Raft(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> DbError {
    DbError::Unavailable(format!(
        "the cluster database is unavailable ({e}); retry once a leader is elected"
    ))
}

impl Cluster {
    /// Start this member's raft node on its storage under `dir`.
    pub async fn start(
        dir: &Path,
        config: ClusterConfig,
        cert: ClusterCert,
        db: Arc<Db>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let peers = PeerClient::new(ferry_cluster::mtls::member_client_config(&cert)?);
        let network = net::Network {
            peers: peers.clone().with_timeout(Duration::from_secs(3)),
        };
        let (raft, db) =
            raft::open_raft_with(config.node_id, dir, raft_config(), network, Some(db))
                .await
                .map_err(raft_err)?;
        let c = Arc::new(Cluster {
            config,
            raft,
            db,
            peers,
            cert,
            seen: Mutex::new(HashMap::new()),
        });
        tokio::spawn(heartbeat_loop(Arc::downgrade(&c)));
        Ok(c)
    }

    pub fn node(&self) -> openraft::BasicNode {
        openraft::BasicNode {
            addr: self.config.address.clone(),
        }
    }

    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.node_id)
    }

    /// Commit one typed command (here or via the leader); returns once it is
    /// applied on the leader AND on this member (read-your-writes here).
    pub async fn write(&self, cmd: Command) -> Result<u64, DbError> {
        // One id for every attempt: a retry after an answer that got lost
        // (the write was applied) is answered with the first outcome instead
        // of being applied again.
        let entry = LogCommand::new(cmd).with_request(request_id());
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(left, self.raft.client_write(entry.clone())).await;
            let last_err = match attempt {
                Err(_) => format!("no quorum: a majority of the cluster's voters did not confirm the write within {} s — check `ferry cluster list` for offline members; writes resume once a majority is back", WRITE_TIMEOUT.as_secs()),
                Ok(Ok(resp)) => return self.applied_here(resp.log_id.index, resp.data).await,
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_node {
                    Some(node) => {
                        let peers = self.peers.clone().with_timeout(left.max(Duration::from_millis(100)));
                        match peers.call::<_, ForwardedWrite>(&node.addr, WRITE_PATH, &entry).await {
                            Ok(r) => return self.applied_here(r.log_index, r.result).await,
                            Err(e) => format!("no quorum or no reachable leader ({e})"),
                        }
                    }
                    None => "no leader elected (no quorum?)".to_string(),
                },
                Ok(Err(e)) => e.to_string(),
            };
            if Instant::now() + Duration::from_millis(200) >= deadline {
                return Err(unavailable(last_err));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn applied_here(&self, log_index: u64, result: ApplyResult) -> Result<u64, DbError> {
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(log_index), "local apply of own write")
            .await
            .map_err(|e| {
                unavailable(format!(
                    "committed, but not applied on this member yet: {e}"
                ))
            })?;
        result.into_result()
    }

    /// Wait until this member's DB reflects every write committed before the
    /// call (a linearizable read barrier), asking the leader when not leader.
    pub async fn barrier(&self) -> Result<(), ClusterError> {
        let index = match self.raft.ensure_linearizable().await {
            Ok(id) => id.map(|l| l.index).unwrap_or(0),
            Err(_) => {
                let (_, addr) = self
                    .leader()
                    .ok_or_else(|| ClusterError::Raft("no leader".into()))?;
                self.peers.call::<_, u64>(&addr, BARRIER_PATH, &()).await?
            }
        };
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(raft_err)?;
        Ok(())
    }

    /// Leader side of a barrier: confirm leadership, return the read index.
    pub async fn read_index(&self) -> Result<u64, ClusterError> {
        let id = self.raft.ensure_linearizable().await.map_err(raft_err)?;
        Ok(id.map(|l| l.index).unwrap_or(0))
    }

    pub fn record_heartbeat(&self, hb: Heartbeat) {
        self.seen
            .lock()
            .unwrap()
            .insert(hb.name.clone(), (Instant::now(), hb));
    }

    /// Is `name` online? Uses the last heartbeat; a member not heard from yet
    /// (e.g. it just joined) is asked directly.
    pub async fn check_online(&self, name: &str, address: &str) -> bool {
        if let Some((true, _)) = self.member_seen(name) {
            return true;
        }
        let peers = self.peers.clone().with_timeout(Duration::from_secs(2));
        match peers
            .call::<_, Heartbeat>(address, HEARTBEAT_PATH, &local_heartbeat(&self.config.name))
            .await
        {
            Ok(hb) => {
                self.record_heartbeat(hb);
                true
            }
            Err(_) => false,
        }
    }

    /// Online status and last heartbeat of a member.
    pub fn member_seen(&self, name: &str) -> Option<(bool, Heartbeat)> {
        if name == self.config.name {
            return Some((true, local_heartbeat(name)));
        }
        let seen = self.seen.lock().unwrap();
        seen.get(name)
            .map(|(t, hb)| (t.elapsed() < OFFLINE_AFTER, hb.clone()))
    }
}

/// A fresh request id for a replicated write: 128 random bits, hex.
fn request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Raft settings: the defaults of `ferry_cluster::raft::default_config`, and
/// `FERRY_RAFT_SNAPSHOT_EVERY=N` to snapshot (and purge the log) every N
/// entries — a tuning knob, used by tests to force catch-up by snapshot.
fn raft_config() -> openraft::Config {
    let mut c = raft::default_config();
    if let Some(n) = std::env::var("FERRY_RAFT_SNAPSHOT_EVERY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
    {
        c.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(n);
        c.max_in_snapshot_log_to_keep = 0;
        c.purge_batch_size = 1;
    }
    c
}

pub fn mem_free() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn local_heartbeat(name: &str) -> Heartbeat {
    Heartbeat {
        name: name.to_string(),
        version: crate::core::VERSION.to_string(),
        mem_free: mem_free(),
        instance_memory: LOCAL_RESOURCES.get().map_or(0, |r| r.instance_memory),
        disk_free: LOCAL_RESOURCES.get().map_or(0, |r| disk_free(&r.storage)),
    }
}

/// Every second, ask every other member for its heartbeat (over mTLS).
async fn heartbeat_loop(cluster: std::sync::Weak<Cluster>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(c) = cluster.upgrade() else { return };
        let Ok(members) = c.db.list_members() else {
            continue;
        };
        for m in members.into_iter().filter(|m| m.name != c.config.name) {
            let c2 = c.clone();
            tokio::spawn(async move {
                let peers = c2.peers.clone().with_timeout(Duration::from_secs(2));
                if let Ok(hb) = peers
                    .call::<_, Heartbeat>(
                        &m.address,
                        HEARTBEAT_PATH,
                        &local_heartbeat(&c2.config.name),
                    )
                    .await
                {
                    c2.record_heartbeat(hb);
                }
            });
        }
    }
}
