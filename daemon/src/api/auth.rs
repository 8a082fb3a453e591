//! Per-endpoint authorization from what the TLS layer established.
//!
//! | peer | may use |
//! |---|---|
//! | unix socket (root only) | everything |
//! | a member (cluster certificate) | everything, including `/internal/*` |
//! | a trusted client certificate | `/1.0/*` |
//! | no client certificate | `GET /1.0` and the join endpoint (which checks its token) |

use axum::extract::{ConnectInfo, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use ferry_cluster::PeerKind;

use crate::tls::Peer;

pub fn allowed(peer: &Peer, method: &Method, path: &str) -> bool {
    match peer {
        Peer::Local => true,
        Peer::Remote {
            kind: PeerKind::Member,
            ..
        } => true,
        Peer::Remote {
            kind: PeerKind::TrustedClient(_),
            ..
        } => !path.starts_with("/internal"),
        Peer::Remote {
            kind: PeerKind::Anonymous,
            ..
        } => {
            (method == Method::GET && matches!(path, "/" | "/1.0" | "/1.0/"))
                || (method == Method::POST && path == crate::cluster::JOIN_PATH)
        }
    }
}

pub async fn authorize(ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    if allowed(&peer, req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    if let Peer::Remote { addr, kind } = &peer {
        tracing::info!(%addr, ?kind, path = %req.uri().path(), "request refused: not authorized");
    }
    let msg = match &peer {
        Peer::Remote { kind: PeerKind::TrustedClient(_), .. } => "not authorized: this endpoint is for cluster members only".to_string(),
        _ => "not authorized: connect with a trusted client certificate (copy it to the server's DIR/trust/<fingerprint>.crt) or use the local unix socket".to_string(),
    };
    super::error(StatusCode::FORBIDDEN, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(kind: PeerKind) -> Peer {
        Peer::Remote {
            addr: "127.0.0.1:1".parse().unwrap(),
            kind,
        }
    }

    #[test]
    fn rules() {
        let anon = remote(PeerKind::Anonymous);
        assert!(allowed(&anon, &Method::GET, "/1.0"));
        assert!(!allowed(&anon, &Method::GET, "/1.0/instances"));
        assert!(!allowed(&anon, &Method::POST, "/internal/raft/append"));
        assert!(allowed(&anon, &Method::POST, crate::cluster::JOIN_PATH));
        let user = remote(PeerKind::TrustedClient("ab".into()));
        assert!(allowed(&user, &Method::DELETE, "/1.0/instances/c1"));
        assert!(!allowed(&user, &Method::POST, "/internal/raft/vote"));
        assert!(allowed(
            &remote(PeerKind::Member),
            &Method::POST,
            "/internal/raft/vote"
        ));
        assert!(allowed(&Peer::Local, &Method::POST, "/internal/raft/vote"));
    }
}
