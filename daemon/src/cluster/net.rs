//! openraft's network over member-to-member mTLS: each RPC is one HTTPS POST
//! of the JSON-encoded request to `/internal/raft/<rpc>`; the peer answers
//! with the JSON of `Result<response, RaftError>`.

use ferry_cluster::raft::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::peer::{PeerClient, PeerError};

pub const APPEND_PATH: &str = "/internal/raft/append";
pub const VOTE_PATH: &str = "/internal/raft/vote";
pub const SNAPSHOT_PATH: &str = "/internal/raft/snapshot";

type RpcResult<T, E = RaftError<NodeId>> = Result<T, RPCError<NodeId, BasicNode, E>>;

#[derive(Clone)]
pub struct Network {
    pub peers: PeerClient,
}

pub struct Connection {
    target: NodeId,
    addr: String,
    peers: PeerClient,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

impl Connection {
    async fn rpc<Req, Resp, E>(&self, path: &str, req: &Req) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Result<Resp, E>, PeerError> =
            self.peers.call(&self.addr, path, req).await;
        match reply {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e @ PeerError::Connect { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.rpc(APPEND_PATH, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.rpc(SNAPSHOT_PATH, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.rpc(VOTE_PATH, &rpc).await
    }
}
