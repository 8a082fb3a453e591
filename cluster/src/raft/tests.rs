//! Raft storage tests: openraft's storage suite against [`LogStore`] + [`StateMachine`],
//! and clusters of real `openraft::Raft` nodes in one process over a fake network that
//! calls the other nodes directly (after a JSON round trip, as the real network does).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_db::{Command, Db, DbError, InstanceRecord, LogCommand};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError as OpenRaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{BasicNode, StorageError, StorageIOError};
use tempfile::TempDir;

use super::*;

type RpcResult<T, E = OpenRaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

// ---- openraft's storage suite ----

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let (log_store, sm, _db) = open_storage(dir.path())
            .await
            .map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log_store, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

// ---- fake network ----

/// All nodes of a test cluster, by id. A node in `down` is unreachable.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<NodeId, Raft>>>,
    down: Arc<Mutex<BTreeSet<NodeId>>>,
}

impl Router {
    fn get(&self, target: NodeId) -> Result<Raft, Unreachable> {
        if self.down.lock().unwrap().contains(&target) {
            return Err(Unreachable::new(&std::io::Error::other("node is down")));
        }
        self.nodes
            .lock()
            .unwrap()
            .get(&target)
            .cloned()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other("no such node")))
    }
}

struct Connection {
    target: NodeId,
    router: Router,
}

/// Sends `value` through JSON, as the daemon's HTTP network will.
fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(value: T) -> Result<T, NetworkError> {
    let json = serde_json::to_vec(&value).map_err(|e| NetworkError::new(&e))?;
    serde_json::from_slice(&json).map_err(|e| NetworkError::new(&e))
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            target,
            router: self.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.router.get(self.target)?;
        let reply = raft.append_entries(wire(rpc)?).await;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, OpenRaftError<NodeId, InstallSnapshotError>>
    {
        let raft = self.router.get(self.target)?;
        let reply = raft.install_snapshot(wire(rpc)?).await;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.router.get(self.target)?;
        let reply = raft.vote(wire(rpc)?).await;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

// ---- cluster helpers ----

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn test_config() -> openraft::Config {
    openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..default_config()
    }
}

struct Member {
    raft: Raft,
    db: Arc<Db>,
}

struct Cluster {
    dir: TempDir,
    router: Router,
    members: BTreeMap<NodeId, Member>,
    config: openraft::Config,
}

impl Cluster {
    fn new(config: openraft::Config) -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            router: Router::default(),
            members: BTreeMap::new(),
            config,
        }
    }

    async fn start(&mut self, id: NodeId) {
        let dir = self.dir.path().join(format!("m{id}"));
        let (raft, db) = open_raft(id, &dir, self.config.clone(), self.router.clone())
            .await
            .unwrap();
        self.router.nodes.lock().unwrap().insert(id, raft.clone());
        self.members.insert(id, Member { raft, db });
    }

    async fn stop(&mut self, id: NodeId) {
        let member = self.members.remove(&id).unwrap();
        self.router.nodes.lock().unwrap().remove(&id);
        member.raft.shutdown().await.unwrap();
    }

    fn raft(&self, id: NodeId) -> &Raft {
        &self.members[&id].raft
    }

    async fn leader(&self) -> NodeId {
        let any = self.members.values().next().unwrap();
        let m = any
            .raft
            .wait(WAIT)
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .unwrap();
        m.current_leader.unwrap()
    }

    async fn write(&self, cmd: Command) -> ApplyResult {
        let leader = self.leader().await;
        let resp = self
            .raft(leader)
            .client_write(LogCommand::new(cmd))
            .await
            .unwrap();
        assert_eq!(resp.data.index(), resp.log_id.index);
        resp.data
    }

    /// Waits until every member applied `index`, then returns the common checksum.
    async fn converged(&self, index: u64) -> String {
        let mut sums = BTreeSet::new();
        for (id, m) in &self.members {
            m.raft
                .wait(WAIT)
                .applied_index_at_least(Some(index), format!("member {id} applies {index}"))
                .await
                .unwrap();
            sums.insert(m.db.checksum().unwrap());
        }
        assert_eq!(sums.len(), 1, "members diverged: {sums:?}");
        sums.into_iter().next().unwrap()
    }
}

fn node(id: NodeId) -> BasicNode {
    BasicNode::new(format!("127.0.0.1:{}", 8443 + id))
}

fn record(name: &str, member: &str) -> InstanceRecord {
    InstanceRecord {
        name: name.into(),
        kind: "container".into(),
        member: member.into(),
        status: "Stopped".into(),
        storage_pool: "default".into(),
        image: "busybox".into(),
        description: String::new(),
        config: BTreeMap::from([("limits.memory".into(), "64MiB".into())]),
        volatile: BTreeMap::new(),
        created_at: "2025-01-01T00:00:00Z".into(),
        last_used_at: "2025-01-01T00:00:00Z".into(),
    }
}

fn create(name: &str) -> Command {
    Command::CreateInstance {
        record: record(name, "m1"),
    }
}

fn move_to(name: &str, from: &str, to: &str) -> Command {
    Command::MoveInstance {
        name: name.into(),
        from_member: from.into(),
        to_member: to.into(),
    }
}

async fn three_members(config: openraft::Config) -> Cluster {
    let mut cluster = Cluster::new(config);
    for id in 1..=3 {
        cluster.start(id).await;
    }
    let members: BTreeMap<_, _> = (1..=3).map(|id| (id, node(id))).collect();
    cluster.raft(1).initialize(members).await.unwrap();
    cluster
}

// ---- cluster tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_and_agree_on_rejections() {
    let cluster = three_members(test_config()).await;

    assert!(matches!(
        cluster.write(create("c1")).await,
        ApplyResult::Applied { .. }
    ));
    cluster.write(create("c2")).await;
    cluster.write(move_to("c1", "m1", "m2")).await;

    // A duplicate create is refused on every member, but its index is applied.
    let dup = cluster.write(create("c1")).await;
    let ApplyResult::Rejected { index, .. } = &dup else {
        panic!("duplicate create was applied: {dup:?}");
    };
    let index = *index;
    assert!(matches!(
        dup.clone().into_result(),
        Err(DbError::AlreadyExists { what: "instance", ref name }) if name == "c1"
    ));
    // A lost compare-and-set race is a Conflict.
    let lost = cluster.write(move_to("c1", "m1", "m3")).await;
    assert!(matches!(lost.into_result(), Err(DbError::Conflict(m)) if m.contains("m2")));

    // The log keeps working after rejections.
    let last = cluster.write(move_to("c2", "m1", "m3")).await;
    assert!(last.index() > index);
    cluster.converged(last.index()).await;
    for m in cluster.members.values() {
        assert_eq!(m.db.applied_index().unwrap(), last.index());
        assert_eq!(m.db.get_instance("c1").unwrap().unwrap().member, "m2");
        assert_eq!(m.db.get_instance("c2").unwrap().unwrap().member, "m3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_member_keeps_its_log_and_state() {
    let mut cluster = three_members(test_config()).await;
    for i in 0..5 {
        cluster.write(create(&format!("c{i}"))).await;
    }
    cluster.stop(3).await;
    let last = cluster.write(move_to("c0", "m1", "m2")).await;
    cluster.start(3).await;
    let sum = cluster.converged(last.index()).await;
    assert_eq!(cluster.members[&3].db.checksum().unwrap(), sum);
    assert_eq!(cluster.members[&3].db.list_instances().unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_catches_up_by_snapshot_and_becomes_voter() {
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..test_config()
    };
    let mut cluster = three_members(config).await;
    let mut last = 0;
    for i in 0..25 {
        last = cluster.write(create(&format!("c{i:02}"))).await.index();
    }
    cluster.write(move_to("c00", "m1", "m2")).await;
    let leader = cluster.leader().await;
    let raft = cluster.raft(leader).clone();
    raft.trigger().snapshot().await.unwrap();
    let m = raft
        .wait(WAIT)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "snapshot built",
        )
        .await
        .unwrap();
    let snap = m.snapshot.unwrap();
    raft.trigger().purge_log(snap.index).await.unwrap();
    raft.wait(WAIT)
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= snap.index),
            "log purged",
        )
        .await
        .unwrap();

    // Node 4 starts empty; the leader no longer has the early entries, so it must send
    // the snapshot.
    cluster.start(4).await;
    raft.add_learner(4, node(4), true).await.unwrap();
    let m4 = cluster
        .raft(4)
        .wait(WAIT)
        .metrics(|m| m.snapshot.is_some(), "member 4 installed a snapshot")
        .await
        .unwrap();
    assert!(m4.snapshot.unwrap().index >= snap.index);
    raft.change_membership(BTreeSet::from([1, 2, 3, 4]), false)
        .await
        .unwrap();
    let after = cluster.write(move_to("c01", "m1", "m4")).await.index();
    let sum = cluster.converged(after).await;
    let db4 = &cluster.members[&4].db;
    assert_eq!(db4.checksum().unwrap(), sum);
    assert_eq!(db4.list_instances().unwrap().len(), 25);
    assert_eq!(db4.get_instance("c00").unwrap().unwrap().member, "m2");
    let voters: BTreeSet<_> = cluster
        .raft(4)
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3, 4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_restarted_after_compaction_catches_up_by_snapshot() {
    let config = openraft::Config {
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5),
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
        ..test_config()
    };
    let mut cluster = three_members(config).await;
    cluster.write(create("c00")).await;
    let leader = cluster.leader().await;
    let down = (1..=3).find(|&id| id != leader).unwrap();
    cluster.stop(down).await;

    let mut last = 0;
    for i in 1..20 {
        last = cluster.write(create(&format!("c{i:02}"))).await.index();
    }
    let raft = cluster.raft(leader).clone();
    // A trigger is ignored while a snapshot is being built (the policy may
    // have started one a few entries back): trigger again until one covers
    // the last write.
    let deadline = std::time::Instant::now() + WAIT.unwrap_or_default();
    loop {
        raft.trigger().snapshot().await.unwrap();
        let built = raft
            .wait(Some(Duration::from_millis(500)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= last),
                "snapshot built",
            )
            .await;
        if built.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot covering index {last}: {built:?}"
        );
    }
    raft.trigger().purge_log(last).await.unwrap();
    raft.wait(WAIT)
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "log purged")
        .await
        .unwrap();

    cluster.start(down).await;
    cluster
        .raft(down)
        .wait(WAIT)
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "restarted member installed the snapshot",
        )
        .await
        .unwrap();
    let sum = cluster.converged(last).await;
    assert_eq!(
        cluster.members[&down].db.list_instances().unwrap().len(),
        20
    );
    assert_eq!(cluster.members[&down].db.checksum().unwrap(), sum);
}
