//! Listeners: the root-only unix socket and optional HTTPS.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use crate::tls::Peer;
use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::core::Daemon;

pub async fn serve(daemon: Arc<Daemon>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let app = crate::api::router(daemon.clone());
    let sock = daemon.dir.join("unix.socket");
    if sock.exists() {
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            anyhow::bail!(
                "another ferryd is already serving {}: stop it first or use another --dir",
                sock.display()
            );
        }
        std::fs::remove_file(&sock)?;
    }
    let unix = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("cannot bind {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let shutdown = shutdown_signal();
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let mut rx = stop_tx.subscribe();
        let app = app.clone();
        tasks.spawn(async move {
            axum::serve(unix, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(async move {
                    let _ = rx.recv().await;
                })
                .await
        });
    }
    if let Some(addr) = listen {
        let listener = crate::tls::TlsListener::bind(addr, daemon.tls.clone())
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(%addr, "HTTPS listening");
        let mut rx = stop_tx.subscribe();
        let app = app.clone();
        tasks.spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(async move {
                    let _ = rx.recv().await;
                })
                .await
        });
    }
    tracing::info!(socket = %sock.display(), member = %daemon.member, "ferryd ready");
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        r = tasks.join_next() => tracing::error!(?r, "a listener stopped"),
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}
