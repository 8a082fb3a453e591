//! The target side of a move: dial the source's channels, receive the
//! root filesystem and the checkpoint, restore, report.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_db::Command;
use ferry_drivers::container::ContainerDriver;
use ferry_drivers::storage::{read_archive, ExtractOptions};
use ferry_drivers::{Driver, InstanceSpec, Lifecycle, OpCtx};
use ferry_migration::{
    target_handshake, ByteChannel, Capabilities, Compression, FsTransfer, Message, MessageChannel,
    Plan, QemuFeature, StatePlan, StateTransfer, TargetState,
};
use tokio_util::io::SyncIoBridge;

use super::source::local_end;
use super::ws::{self, WsControl, WsPipe};
use super::SinkRequest;
use crate::core::{ActionError, Daemon};

type ReadBridge = SyncIoBridge<tokio::io::ReadHalf<ByteChannel<tokio::io::DuplexStream>>>;

pub(super) async fn recv_archive(
    bridge: ReadBridge,
    dest: PathBuf,
    allow_existing: bool,
) -> Result<ReadBridge, String> {
    tokio::task::spawn_blocking(move || {
        let mut bridge = bridge;
        if !allow_existing {
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))
                .map_err(|e| e.to_string())?;
        }
        let opts = ExtractOptions {
            allow_devices: true,
            ..Default::default()
        };
        read_archive(&mut bridge, &dest, &opts)
            .map_err(|e| format!("receiving into {}: {e}", dest.display()))?;
        Ok(bridge)
    })
    .await
    .map_err(|e| format!("archive task: {e}"))?
}

impl Daemon {
    /// `/internal/migration/sink`: accept to receive an instance; the work
    /// runs on its own task and reports over the control channel.
    pub async fn migration_sink(self: &Arc<Self>, req: SinkRequest) -> Result<(), ActionError> {
        let cluster = self.require_cluster()?;
        let spec = self.spec_for(&req.record)?;
        if spec.paths.volume.exists() {
            return Err(ActionError::Conflict(format!(
                "member \"{}\" already holds files of instance \"{}\" ({}): remove them first",
                self.member,
                req.record.name,
                spec.paths.volume.display()
            )));
        }
        let lease =
            self.leases_acquire(&req.record.name, "it is being received from another member")?;
        let d = self.clone();
        tokio::spawn(async move {
            let _lease = lease;
            let name = req.record.name.clone();
            if let Err(e) = d.run_sink(&cluster, req, &spec).await {
                tracing::warn!(instance = %name, error = %e, "receiving a moved instance failed; cleaning up");
                let driver = Driver::for_type(spec.kind);
                if driver
                    .state(&spec)
                    .await
                    .map(|s| s.running)
                    .unwrap_or(false)
                {
                    let _ = driver.stop(&spec, true, &OpCtx::detached()).await;
                }
                let _ = driver.delete(&spec).await;
            }
        });
        Ok(())
    }

    async fn run_sink(
        &self,
        cluster: &crate::cluster::Cluster,
        req: SinkRequest,
        spec: &InstanceSpec,
    ) -> Result<(), String> {
        let dial = |secret: &str| {
            let path = format!(
                "/1.0/operations/{}/websocket?secret={}",
                req.operation, secret
            );
            let peers = cluster.peers.clone();
            let addr = req.source_address.clone();
            async move {
                peers
                    .websocket(&addr, &path)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let mut ctl = WsControl(dial(&req.secrets.control).await?);
        let state_pipe = dial(&req.secrets.state).await?;
        let fs_pipe = dial(&req.secrets.fs).await?;
        let caps = Capabilities {
            fs: vec![FsTransfer::Archive {
                compression: vec![Compression::Zstd, Compression::None],
            }],
            state: vec![
                StateTransfer::CriuPageServer,
                StateTransfer::VmQemuLive {
                    features: vec![QemuFeature::AutoConverge, QemuFeature::Postcopy],
                },
                StateTransfer::None,
            ],
            state_compression: vec![Compression::None],
            free_bytes: None,
        };
        let st = target_handshake(&mut ctl, &local_end(), caps)
            .await
            .map_err(|e| e.to_string())?;
        let plan = st.plan().cloned().ok_or("no plan after the handshake")?;
        tracing::info!(instance = %req.record.name, source = %req.source_member, plan = ?plan, "receiving a moved instance");
        let res = if spec.kind == ferry_drivers::InstanceType::VirtualMachine {
            self.receive_vm(
                &mut ctl,
                st,
                &plan,
                spec,
                state_pipe,
                fs_pipe,
                req.launch.clone(),
                req.start_after,
            )
            .await
        } else {
            self.receive(
                &mut ctl,
                st,
                &plan,
                spec,
                state_pipe,
                fs_pipe,
                req.start_after,
            )
            .await
        };
        if let Err(e) = &res {
            let _ = ctl.send(&Message::Failure { message: e.clone() }).await;
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        plan: &Plan,
        spec: &InstanceSpec,
        state_pipe: WsPipe,
        fs_pipe: WsPipe,
        start_after: bool,
    ) -> Result<(), String> {
        let driver = ContainerDriver::default();
        let ctx = OpCtx::detached();
        std::fs::create_dir_all(&spec.paths.volume).map_err(|e| e.to_string())?;
        // Marks a partial receive: removed on success; a ferryd that died
        // mid-receive deletes such volumes when it starts again.
        std::fs::write(receiving_marker(spec), b"").map_err(|e| e.to_string())?;
        let images = spec.paths.volume.join("migration.tmp");
        std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
        // Memory pages: a CRIU page server fed by the state channel.
        let page_server = if matches!(plan.state, StatePlan::CriuPageServer { .. }) {
            let (criu_end, ours) =
                std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
            ours.set_nonblocking(true).map_err(|e| e.to_string())?;
            let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
            let ps = driver
                .page_server_on_socket(&images, std::os::fd::OwnedFd::from(criu_end), &ctx)
                .await
                .map_err(|e| e.to_string())?;
            let state_stream = ws::into_stream(state_pipe);
            let relay = tokio::spawn(async move {
                ferry_migration::relay(state_stream, ours)
                    .await
                    .map_err(|e| e.to_string())
            });
            Some((ps, relay))
        } else {
            None
        };
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let (r, _w) = tokio::io::split(fs);
        let rootfs = spec.paths.volume.join("rootfs");
        let bridge = recv_archive(SyncIoBridge::new(r), rootfs.clone(), false).await?;
        if page_server.is_some() {
            let bridge = recv_archive(bridge, rootfs.clone(), true).await?;
            let meta = spec.paths.volume.join("migration-meta.tmp");
            let _ = std::fs::remove_dir_all(&meta);
            let _bridge = recv_archive(bridge, meta.clone(), false).await?;
            merge_dir(&meta, &images).map_err(|e| format!("checkpoint images: {e}"))?;
        }
        // Control: FsDone (and StateReady for a stateful plan) move us to Restore.
        let mut st = st;
        while !matches!(st, TargetState::Restore { .. }) {
            let msg = ctl
                .recv()
                .await
                .map_err(|e| format!("control channel: {e}"))?;
            let fail = if let Message::Failure { message } = &msg {
                Some(message.clone())
            } else {
                None
            };
            st = st.on_message(msg).map_err(|e| e.to_string())?;
            if let Some(m) = fail {
                return Err(format!("the source failed: {m}"));
            }
            if st.is_terminal() {
                return Err(format!("the source ended the move ({})", st.name()));
            }
        }
        let vol = if let Some((ps, relay)) = page_server {
            let _ = relay.await;
            ps.wait().await.map_err(|e| format!("page server: {e}"))?;
            driver
                .migrate_restore(spec, &images, &ctx)
                .await
                .map_err(|e| format!("restore failed: {e}"))?
        } else if start_after {
            Driver::Container(driver.clone())
                .start(spec, &ctx)
                .await
                .map_err(|e| format!("start failed: {e}"))?
        } else {
            Default::default()
        };
        let _ = std::fs::remove_dir_all(&images);
        st = st.resumed().map_err(|e| e.to_string())?;
        ctl.send(&Message::Resumed {})
            .await
            .map_err(|e| e.to_string())?;
        // The target's volatile keys are the ones that count from now on.
        if !vol.is_empty() {
            if let Err(e) = self
                .submit(Command::UpdateVolatile {
                    name: spec.name.clone(),
                    changes: vol,
                })
                .await
            {
                tracing::warn!(error = %e, "recording volatile keys of the moved instance");
            }
        }
        let _ = std::fs::remove_file(receiving_marker(spec));
        let _st = st.succeed().map_err(|e| e.to_string())?;
        ctl.send(&Message::Success {})
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

pub fn receiving_marker(spec: &InstanceSpec) -> PathBuf {
    spec.paths.volume.join(".ferry-receiving")
}

impl Daemon {
    /// At start: delete volumes left by a receive this member never finished
    /// (the instance's record does not place it here).
    pub fn clean_partial_receives(&self) {
        let Ok(recs) = self.db().list_instances() else {
            return;
        };
        for rec in recs.iter().filter(|r| r.member != self.member) {
            let Ok(spec) = self.spec_for(rec) else {
                continue;
            };
            if receiving_marker(&spec).exists() {
                tracing::warn!(instance = %rec.name, "removing the files of a move this member never finished receiving");
                let _ = std::fs::remove_dir_all(&spec.paths.volume);
            }
        }
    }
}

/// Move every file of `from` into `to` (keeping what `to` already has), then remove `from`.
fn merge_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if !dest.exists() {
            std::fs::rename(e.path(), dest)?;
        }
    }
    std::fs::remove_dir_all(from)
}
