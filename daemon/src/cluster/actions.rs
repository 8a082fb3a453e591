//! Cluster actions of the daemon: enable, tokens, join, members, remove.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_cluster::raft::NodeId;
use ferry_cluster::token::{secret_digest, JoinToken};
use ferry_cluster::ClusterCert;
use ferry_db::Command;
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::peer::PeerClient;
use super::{Cluster, ClusterConfig, ClusterError, JOIN_PATH};
use crate::core::{now_rfc3339, ActionError, Daemon};
use crate::tls::TlsMode;

const TOKEN_TTL: Duration = Duration::from_secs(3 * 3600);

/// What a joiner sends (over TLS pinned to the token's fingerprint).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub name: String,
    pub node_id: NodeId,
    pub address: String,
    pub version: String,
    pub secret: String,
}

/// What it gets back: the shared cluster certificate and key.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub cert_pem: String,
    pub key_pem: String,
}

impl From<ClusterError> for ActionError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::Refused(m) => ActionError::BadRequest(m),
            other => ActionError::Internal(other.to_string()),
        }
    }
}

fn new_node_id() -> NodeId {
    loop {
        let id = rand::random::<u64>() >> 1;
        if id != 0 {
            return id;
        }
    }
}

impl Daemon {
    fn require_address(&self) -> Result<String, ActionError> {
        self.listen.map(|a| a.to_string()).ok_or_else(|| {
            ActionError::BadRequest(
                "this member has no cluster address: restart ferryd with --listen ADDR:PORT".into(),
            )
        })
    }

    fn require_standalone(&self) -> Result<(), ActionError> {
        if self.cluster().is_some() {
            return Err(ActionError::BadRequest(format!(
                "member \"{}\" is already part of a cluster",
                self.member
            )));
        }
        Ok(())
    }

    pub fn require_cluster(&self) -> Result<Arc<Cluster>, ActionError> {
        self.cluster().ok_or_else(|| {
            ActionError::BadRequest(
                "this member is not clustered: run `ferry cluster enable NAME` first".into(),
            )
        })
    }

    /// `ferry cluster enable NAME`: create the cluster with this member as its first voter.
    pub async fn cluster_enable(self: &Arc<Self>, name: &str) -> Result<(), ActionError> {
        self.require_standalone()?;
        if name != self.member {
            return Err(ActionError::BadRequest(format!(
                "this member is named \"{}\" (ferryd --name): enable the cluster with that name",
                self.member
            )));
        }
        let address = self.require_address()?;
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_default();
        let cert = ClusterCert::create(&self.dir, &[host]).map_err(ClusterError::from)?;
        let config = ClusterConfig {
            version: 1,
            name: name.to_string(),
            node_id: new_node_id(),
            address: address.clone(),
        };
        config.save(&self.dir)?;
        let cluster = self.start_cluster(config, cert).await?;
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(cluster.config.node_id, cluster.node());
        cluster
            .raft
            .initialize(nodes)
            .await
            .map_err(|e| ActionError::Internal(format!("raft initialize: {e}")))?;
        cluster
            .write(Command::AddMember {
                name: name.to_string(),
                node_id: cluster.config.node_id,
                address,
                version: crate::core::VERSION.to_string(),
                joined_at: now_rfc3339(),
            })
            .await?;
        tracing::info!(member = %name, "cluster enabled");
        Ok(())
    }

    /// Start the raft node and switch the DB, write path and TLS to cluster mode.
    pub async fn start_cluster(
        &self,
        config: ClusterConfig,
        cert: ClusterCert,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let cluster = Cluster::start(&self.dir, config, cert.clone(), self.db()).await?;
        self.set_cluster(cluster.clone());
        self.tls
            .set_mode(TlsMode::Cluster(cert))
            .map_err(|e| ClusterError::Refused(e.to_string()))?;
        Ok(cluster)
    }

    /// `ferry cluster add NAME`: a one-time join token for a new member.
    pub async fn cluster_add(&self, name: &str) -> Result<JoinToken, ActionError> {
        let c = self.require_cluster()?;
        crate::core::validate_member_name(name)?;
        c.barrier().await?;
        if c.db.get_member(name)?.is_some() {
            return Err(ActionError::Conflict(format!(
                "member \"{name}\" is already in the cluster"
            )));
        }
        let addresses: Vec<String> =
            c.db.list_members()?
                .into_iter()
                .map(|m| m.address)
                .collect();
        let token = JoinToken::new(name, addresses, c.cert.fingerprint(), TOKEN_TTL);
        c.write(Command::AddJoinToken {
            member_name: name.to_string(),
            secret_sha256: secret_digest(&token.secret),
            expires_at: token.expires_at,
            created_at: now_rfc3339(),
        })
        .await?;
        Ok(token)
    }

    /// `ferry cluster join TOKEN` on a new, empty member.
    pub async fn cluster_join(self: &Arc<Self>, token: &str) -> Result<(), ActionError> {
        self.require_standalone()?;
        let address = self.require_address()?;
        let token = JoinToken::decode(token).map_err(|e| ActionError::BadRequest(e.to_string()))?;
        token
            .check_expiry(chrono::Utc::now().timestamp())
            .map_err(|e| ActionError::BadRequest(e.to_string()))?;
        if token.member_name != self.member {
            return Err(ActionError::BadRequest(format!(
                "this token is for member \"{}\" but this member is \"{}\": ask for a token with `ferry cluster add {}`",
                token.member_name, self.member, self.member
            )));
        }
        if !self.db().list_instances()?.is_empty() {
            return Err(ActionError::BadRequest(
                "this member has instances: delete them before joining a cluster".into(),
            ));
        }
        let tls = ferry_cluster::mtls::joiner_client_config(&token.fingerprint)
            .map_err(ClusterError::from)?;
        let joiner = PeerClient::new(tls);
        let req = JoinRequest {
            name: self.member.clone(),
            node_id: new_node_id(),
            address: address.clone(),
            version: crate::core::VERSION.to_string(),
            secret: token.secret.clone(),
        };
        let mut last = String::from("the token lists no address");
        let mut reply = None;
        for addr in &token.addresses {
            match joiner.call::<_, JoinReply>(addr, JOIN_PATH, &req).await {
                Ok(r) => {
                    reply = Some(r);
                    break;
                }
                Err(super::peer::PeerError::Status { message, .. }) => {
                    return Err(ActionError::BadRequest(message))
                }
                Err(e) => last = e.to_string(),
            }
        }
        let reply = reply
            .ok_or_else(|| ActionError::BadRequest(format!("cannot reach the cluster: {last}")))?;
        let cert =
            ClusterCert::from_pem(&reply.cert_pem, &reply.key_pem).map_err(ClusterError::from)?;
        cert.check_fingerprint(&token.fingerprint)
            .map_err(ClusterError::from)?;
        cert.save(&self.dir).map_err(ClusterError::from)?;
        let config = ClusterConfig {
            version: 1,
            name: self.member.clone(),
            node_id: req.node_id,
            address,
        };
        config.save(&self.dir)?;
        let cluster = self.start_cluster(config, cert).await?;
        wait_voter(&cluster).await?;
        tracing::info!(member = %self.member, "joined the cluster");
        Ok(())
    }

    /// Leader side of a join: check the token (in the replicated command),
    /// add the node as a learner, promote it once it caught up.
    pub async fn handle_join(self: &Arc<Self>, req: JoinRequest) -> Result<JoinReply, ActionError> {
        let c = self.require_cluster()?;
        if !c.is_leader() {
            let (_, leader) = c
                .leader()
                .ok_or_else(|| ActionError::Internal("no cluster leader yet: retry".into()))?;
            return c
                .peers
                .call(&leader, JOIN_PATH, &req)
                .await
                .map_err(|e| match e {
                    super::peer::PeerError::Status { message, .. } => {
                        ActionError::BadRequest(message)
                    }
                    other => ActionError::Internal(other.to_string()),
                });
        }
        crate::core::validate_member_name(&req.name)?;
        c.write(Command::JoinMember {
            name: req.name.clone(),
            node_id: req.node_id,
            address: req.address.clone(),
            version: req.version.clone(),
            secret_sha256: secret_digest(&req.secret),
            now: chrono::Utc::now().timestamp(),
            joined_at: now_rfc3339(),
        })
        .await
        .map_err(|e| ActionError::BadRequest(format!("join refused: {e}")))?;
        let node = openraft::BasicNode {
            addr: req.address.clone(),
        };
        c.raft
            .add_learner(req.node_id, node, false)
            .await
            .map_err(|e| ActionError::Internal(format!("add learner: {e}")))?;
        tokio::spawn(promote_when_caught_up(c.clone(), req.node_id));
        Ok(JoinReply {
            cert_pem: c.cert.cert_pem().to_string(),
            key_pem: c.cert.key_pem().to_string(),
        })
    }

    /// `GET /1.0/cluster/members?recursion=1`, Incus-shaped.
    pub fn members_json(&self) -> Result<Vec<Value>, ActionError> {
        let c = self.require_cluster()?;
        let m = c.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let mut out = vec![];
        for rec in c.db.list_members()? {
            let (online, hb) = c.member_seen(&rec.name).unwrap_or_default();
            let status = if rec.state == "evacuated" {
                "Evacuated"
            } else if online {
                "Online"
            } else {
                "Offline"
            };
            let role = if m.current_leader == Some(rec.node_id) {
                "database-leader"
            } else if voters.contains(&rec.node_id) {
                "database"
            } else {
                "database-standby"
            };
            out.push(json!({
                "server_name": rec.name, "url": format!("https://{}", rec.address), "database": voters.contains(&rec.node_id),
                "status": status, "message": if status == "Evacuated" { "Unavailable due to maintenance" } else if online { "Fully operational" } else { "No heartbeat" },
                "architecture": std::env::consts::ARCH, "roles": [role], "failure_domain": "default",
                "description": "", "config": {}, "groups": ["default"],
                "version": if hb.version.is_empty() { rec.version.clone() } else { hb.version.clone() },
                "mem_free": hb.mem_free, "node_id": rec.node_id,
            }));
        }
        Ok(out)
    }

    /// `ferry cluster remove NAME` (on the leader; followers forward it).
    pub async fn cluster_remove(&self, name: &str) -> Result<(), ActionError> {
        let c = self.require_cluster()?;
        let rec =
            c.db.get_member(name)?
                .ok_or_else(|| ActionError::NotFound(format!("member \"{name}\" not found")))?;
        c.write(Command::RemoveMember {
            name: name.to_string(),
        })
        .await?;
        let ids: BTreeSet<NodeId> = [rec.node_id].into();
        c.raft
            .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(|e| ActionError::Internal(format!("raft membership change: {e}")))?;
        let _ = c
            .raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await;
        Ok(())
    }
}

async fn promote_when_caught_up(c: Arc<Cluster>, id: NodeId) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let m = c.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id).cloned().flatten())
            .map(|l| l.index)
            .unwrap_or(0);
        if matched + 1 >= last && matched > 0 {
            match c
                .raft
                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                .await
            {
                Ok(_) => {
                    tracing::info!(node = id, "new member promoted to voter");
                    return;
                }
                Err(e) => tracing::warn!(node = id, error = %e, "promotion failed; retrying"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::error!(
        node = id,
        "new member did not catch up within 120 s; it stays a learner"
    );
}

/// Joiner side: wait until this node is a voter and has applied the log.
async fn wait_voter(c: &Arc<Cluster>) -> Result<(), ActionError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = c.raft.metrics().borrow().clone();
        if m.membership_config
            .membership()
            .voter_ids()
            .any(|v| v == c.config.node_id)
            && c.db.get_member(&c.config.name)?.is_some()
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(ActionError::Internal(
                "joined, but not promoted to voter within 60 s: see the leader's log".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
