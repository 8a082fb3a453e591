//! The target side of a move: dial the source's channels, receive the
//! root filesystem and the checkpoint, restore, report.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_db::Command;
use ferry_drivers::storage::{read_archive, ExtractOptions};
use ferry_drivers::{Driver, InstanceSpec, Lifecycle, OpCtx};
use ferry_migration::{
    target_handshake, ByteChannel, Capabilities, Compression, FsTransfer, Message, MessageChannel,
    Plan, QemuFeature, StateTransfer, TargetState,
};
use tokio_util::io::SyncIoBridge;

use super::ws::{WsControl, WsPipe};
use super::SinkRequest;
use crate::core::{ActionError, Daemon};

/// The channels and the plan, once the handshake is done: control, state,
/// fs and multifd's extra state channels.
type Connected = (WsControl, TargetState, Plan, WsPipe, WsPipe, Vec<WsPipe>);

pub(super) type ReadBridge =
    SyncIoBridge<tokio::io::ReadHalf<ByteChannel<tokio::io::DuplexStream>>>;

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
        // No syncfs per pass (passes 2+ run while the instance is frozen):
        // the volume is made durable once, before `success` lets the source
        // delete its copy (see `report_success`).
        let opts = ExtractOptions {
            allow_devices: true,
            sync: false,
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
        let shared = req.on_shared_pool();
        if shared && self.settings.shared_pool.is_none() {
            return Err(ActionError::BadRequest(format!(
                "instance \"{}\" is on the shared pool, which is not configured on member \"{}\" \
                 (start its ferryd with --shared-pool PATH)",
                req.record.name, self.member
            )));
        }
        if !shared && spec.paths.volume.exists() {
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
                if shared {
                    // The volume is the source's: only our own files go.
                    super::remove_member_files(&spec);
                } else {
                    let _ = driver.delete(&spec).await;
                }
            }
        });
        Ok(())
    }

    async fn run_sink(
        self: &Arc<Self>,
        cluster: &crate::cluster::Cluster,
        req: SinkRequest,
        spec: &InstanceSpec,
    ) -> Result<(), String> {
        // A live VM move's target QEMU starts now, while the channels are
        // dialled and the plan agreed (where the source's request says the
        // plan will need it): it is the longest part of the target's set-up.
        let early = self.launch_early(&req, spec);
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
        // Multifd's extra state channels, where the source offered them and
        // this member's QEMU can take them.
        let multifd = !req.secrets.state_extra.is_empty()
            && self.settings.migration_multifd != crate::settings::Multifd::Off
            && spec.kind == ferry_drivers::InstanceType::VirtualMachine
            && ferry_drivers::vm::VmDriver::multifd_support().await;
        let extra = if multifd {
            req.secrets.state_extra.as_slice()
        } else {
            &[]
        };
        let connected = self
            .connect_and_agree(&req, spec, dial, multifd, extra)
            .await;
        let early = match early {
            Some(task) => Some(task.await.unwrap_or_else(|e| Err(e.to_string()))),
            None => None,
        };
        let (mut ctl, st, plan, state_pipe, fs_pipe, extra_pipes) = match connected {
            Ok(c) => c,
            Err(e) => {
                let why = format!("no plan agreed: {e}");
                self.take_early(early, spec, Some(&why), &req).await;
                return Err(e);
            }
        };
        tracing::info!(instance = %req.record.name, source = %req.source_member, plan = %plan, "receiving a moved instance");
        let res = if spec.kind == ferry_drivers::InstanceType::VirtualMachine {
            self.receive_vm(
                &mut ctl,
                st,
                &plan,
                spec,
                std::iter::once(state_pipe).chain(extra_pipes).collect(),
                fs_pipe,
                early,
                &req,
            )
            .await
        } else {
            self.receive_container(
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

    /// The target's channels (TLS websockets to the source) and the
    /// handshake: the agreed plan.
    async fn connect_and_agree<F, Fut>(
        &self,
        req: &SinkRequest,
        spec: &InstanceSpec,
        dial: F,
        multifd: bool,
        extra: &[String],
    ) -> Result<Connected, String>
    where
        F: Fn(&str) -> Fut,
        Fut: std::future::Future<Output = Result<WsPipe, String>>,
    {
        // The TLS connections are set up at the same time.
        let (ctl, state_pipe, fs_pipe, extra_pipes) = tokio::try_join!(
            dial(&req.secrets.control),
            dial(&req.secrets.state),
            dial(&req.secrets.fs),
            futures::future::try_join_all(extra.iter().map(|s| dial(s)))
        )?;
        let mut ctl = WsControl(ctl);
        let mut qemu_features = vec![
            QemuFeature::AutoConverge,
            QemuFeature::Postcopy,
            QemuFeature::Xbzrle,
            QemuFeature::TargetListens,
        ];
        if multifd && extra_pipes.len() == ferry_migration::MULTIFD_CHANNELS {
            qemu_features.push(QemuFeature::Multifd);
        }
        let mut fs = vec![
            FsTransfer::Archive {
                compression: vec![Compression::Zstd, Compression::None],
            },
            FsTransfer::BlockMirror {
                compression: vec![Compression::None],
            },
        ];
        if let Some(pool_id) = self.settings.shared_pool_id() {
            fs.push(FsTransfer::Shared { pool_id });
        }
        // The pool the volume lands on (a small or full pool refuses here).
        let pools = match (&self.settings.shared_pool, req.record.storage_pool.as_str()) {
            (Some(p), crate::settings::SHARED_POOL) => p.clone(),
            _ => self
                .dir
                .join("storage-pools")
                .join(&req.record.storage_pool),
        };
        let mut state = vec![];
        if spec.kind == ferry_drivers::InstanceType::Container {
            let lazy = ferry_drivers::container::ContainerDriver::lazy_pages_support().await;
            if lazy.is_ok() {
                state.push(StateTransfer::CriuLazyPages);
            }
            state.extend(super::predump::pre_dump_capability().await);
            // Write the dump's pages into images here, without a `criu
            // page-server` (FERRY_PAGE_SINK=0 turns it off, for comparisons).
            if std::env::var("FERRY_PAGE_SINK").as_deref() != Ok("0") {
                state.push(StateTransfer::FerryPageSink {
                    criu_iov: ferry_drivers::container::CRIU_IOV_LAYOUT,
                });
            }
        }
        let caps = Capabilities {
            fs,
            state: [
                state,
                vec![
                    StateTransfer::CriuPageServer,
                    StateTransfer::VmQemuLive {
                        features: qemu_features,
                    },
                    StateTransfer::StatefulStopFile,
                    StateTransfer::None,
                ],
            ]
            .concat(),
            state_compression: vec![
                Compression::ZstdFramesAcked,
                Compression::ZstdFrames,
                Compression::Zstd,
                Compression::None,
            ],
            free_bytes: super::progress::free_bytes(&pools),
        };
        let st = target_handshake(&mut ctl, &self.local_end(), caps)
            .await
            .map_err(|e| e.to_string())?;
        let plan = st.plan().cloned().ok_or("no plan after the handshake")?;
        Ok((ctl, st, plan, state_pipe, fs_pipe, extra_pipes))
    }

    /// Record the volatile keys and send Success (after Resumed). The
    /// received volume is flushed to disk first: after Success the source
    /// deletes its copy.
    pub(super) async fn report_success(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        spec: &InstanceSpec,
        vol: ferry_drivers::VolatileChanges,
    ) -> Result<(), String> {
        let volume = spec.paths.volume.clone();
        let vm = spec.kind == ferry_drivers::InstanceType::VirtualMachine;
        tokio::task::spawn_blocking(move || make_durable(&volume, vm))
            .await
            .map_err(|e| e.to_string())??;
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

/// Flush a received volume to disk. A VM's volume is a few files (its disk
/// image, a state file): fsync each and the directory. A container's rootfs
/// is a tree of many files: one syncfs of its filesystem.
fn make_durable(volume: &Path, vm: bool) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let dir = open(volume)?;
    if !vm {
        return nix::unistd::syncfs(dir.as_raw_fd())
            .map_err(|e| format!("syncfs {}: {e}", volume.display()));
    }
    let entries = std::fs::read_dir(volume).map_err(|e| format!("{}: {e}", volume.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_file() => open(&p)?
                .sync_all()
                .map_err(|e| format!("fsync {}: {e}", p.display()))?,
            // e.g. a state directory: flush its files too.
            Ok(t) if t.is_dir() => make_durable(&p, true)?,
            _ => {}
        }
    }
    dir.sync_all()
        .map_err(|e| format!("fsync {}: {e}", volume.display()))
}

/// The instance runs here: tell the source (the point of no return).
pub(super) async fn send_resumed(
    ctl: &mut WsControl,
    st: TargetState,
    at_us: Option<u64>,
) -> Result<TargetState, String> {
    let st = st.resumed().map_err(|e| e.to_string())?;
    ctl.send(&Message::Resumed { at_us })
        .await
        .map_err(|e| e.to_string())?;
    Ok(st)
}

/// Control: FsDone (and StateReady for a stateful plan) move us to Restore.
pub(super) async fn await_restore(
    ctl: &mut WsControl,
    st: TargetState,
) -> Result<TargetState, String> {
    let mut st = st;
    while !matches!(st, TargetState::Restore { .. }) {
        st = st.recv(ctl).await.map_err(super::peer_error("source"))?.0;
        if st.is_terminal() {
            return Err(format!("the source ended the move ({})", st.name()));
        }
    }
    Ok(st)
}

pub fn receiving_marker(spec: &InstanceSpec) -> PathBuf {
    spec.paths.volume.join(".ferry-receiving")
}

impl Daemon {
    /// At start: delete what a receive this member never finished left
    /// (the instance's record does not place it here): a VM's target QEMU
    /// and runtime files, then the volume. And put back the vCPU priority
    /// of VMs an unfinished outgoing migration left lowered.
    pub async fn recover_unfinished_moves(&self) {
        let Ok(recs) = self.db().list_instances() else {
            return;
        };
        // A VM whose outgoing migration this member's previous ferryd never
        // finished still has its vCPU threads yielding to it.
        for rec in recs.iter().filter(|r| r.member == self.member) {
            let Ok(spec) = self.spec_for(rec) else {
                continue;
            };
            if spec.kind == ferry_drivers::InstanceType::VirtualMachine {
                let n = ferry_drivers::vm::VmDriver::default().restore_vcpu_priority(&spec);
                if n > 0 {
                    tracing::warn!(instance = %rec.name, threads = n, "put the vCPU threads of a VM back at their priority after an unfinished migration");
                }
            }
        }
        for rec in recs.iter().filter(|r| r.member != self.member) {
            let Ok(spec) = self.spec_for(rec) else {
                continue;
            };
            if receiving_marker(&spec).exists() {
                tracing::warn!(instance = %rec.name, "removing the files of a move this member never finished receiving");
                if spec.kind == ferry_drivers::InstanceType::VirtualMachine {
                    ferry_drivers::vm::VmDriver::default()
                        .discard_incoming(&spec)
                        .await;
                }
                let _ = std::fs::remove_dir_all(&spec.paths.volume);
            }
        }
    }
}
