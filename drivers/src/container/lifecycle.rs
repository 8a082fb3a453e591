//! Create, start, stop, query and delete containers.

use std::process::Stdio;

use super::cgroup::Cgroup;
use super::forkstart::ForkstartArgs;
use super::procfs::{self, InitRecord};
use super::{config, image, mounts, remove_if_exists, ContainerDriver, Layout};
use crate::*;

impl Lifecycle for ContainerDriver {
    fn validate(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        config::validate(spec)
    }

    async fn create(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        config::validate(spec)?;
        let l = Layout::of(spec);
        if l.volume_rootfs.exists() {
            return Err(DriverError::WrongState(format!(
                "container {} already has a root filesystem at {}",
                spec.name,
                l.volume_rootfs.display()
            )));
        }
        ctx.progress("stage", "preparing busybox image");
        let images = spec.paths.images.clone();
        let template = tokio::task::spawn_blocking(move || image::ensure_template(&images))
            .await
            .map_err(|e| DriverError::Io {
                context: "image build task".into(),
                source: std::io::Error::other(e),
            })??;
        ctx.check_cancelled("create (nothing was created)")?;
        ctx.progress("stage", "copying root filesystem");
        let (tmp, dst, name) = (
            spec.paths.volume.join("rootfs.tmp"),
            l.volume_rootfs.clone(),
            spec.name.clone(),
        );
        let volume = spec.paths.volume.clone();
        let copy = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&volume)?;
            remove_if_exists(&tmp)?;
            let r = image::copy_tree(&template, &tmp).and_then(|_| image::personalize(&tmp, &name));
            if r.is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            r?;
            std::fs::rename(&tmp, &dst)
        })
        .await
        .map_err(|e| DriverError::Io {
            context: "rootfs copy task".into(),
            source: std::io::Error::other(e),
        })?;
        copy.map_err(DriverError::io(format!(
            "copy busybox rootfs into {}",
            l.volume_rootfs.display()
        )))?;
        if ctx.is_cancelled() {
            let _ = std::fs::remove_dir_all(&l.volume_rootfs);
            return Err(DriverError::Cancelled(
                "create (the copied rootfs was removed)".into(),
            ));
        }
        Ok(super::stopped())
    }

    async fn start(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        config::validate(spec)?;
        let l = Layout::of(spec);
        if let Some(rec) = self.running_record(spec) {
            return Err(DriverError::WrongState(format!(
                "container {} is already running (pid {})",
                spec.name, rec.pid
            )));
        }
        if !l.volume_rootfs.join("sbin/init").exists() {
            return Err(DriverError::WrongState(format!(
                "container {} has no root filesystem; create it first",
                spec.name
            )));
        }
        ctx.check_cancelled("start (nothing was done)")?;
        ctx.progress("stage", "preparing container");
        self.cleanup_host(spec).await?; // leftovers of a crash
        std::fs::create_dir_all(&spec.paths.run).map_err(DriverError::io(format!(
            "create {}",
            spec.paths.run.display()
        )))?;
        let cg = self.setup_cgroup(spec)?;
        match self.spawn_init(spec, &l, cg.as_ref(), ctx).await {
            Ok(rec) => {
                tracing::info!(container = %spec.name, pid = rec.pid, "container started");
                Ok(super::running(spec))
            }
            Err(e) => {
                if let Some(rec) = InitRecord::read(&l.pidfile).filter(procfs::check_running) {
                    let _ = self.terminate(&rec, true).await;
                }
                let _ = self.cleanup_host(spec).await;
                Err(e)
            }
        }
    }

    async fn stop(
        &self,
        spec: &InstanceSpec,
        force: bool,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        if let Some(rec) = self.running_record(spec) {
            ctx.check_cancelled("stop (the container is still running)")?;
            ctx.progress(
                "stage",
                if force {
                    "killing container"
                } else {
                    "stopping container"
                },
            );
            self.terminate(&rec, force).await?;
        }
        ctx.progress("stage", "cleaning up");
        self.cleanup_host(spec).await?;
        Ok(super::stopped())
    }

    async fn state(&self, spec: &InstanceSpec) -> Result<RuntimeState, DriverError> {
        let Some(rec) = self.running_record(spec) else {
            return Ok(RuntimeState::default());
        };
        let cg = Cgroup::for_instance(&spec.name, &spec.paths.volume).filter(Cgroup::exists);
        let in_cg = cg.as_ref().map(|c| c.pids().len()).unwrap_or(0);
        let processes = if in_cg > 0 {
            in_cg
        } else {
            procfs::count_tree(rec.pid, &procfs::list_procs())
        };
        Ok(RuntimeState {
            running: true,
            pid: rec.pid,
            processes: processes as i64,
            memory_usage: cg.and_then(|c| c.memory_usage()).unwrap_or(0),
        })
    }

    async fn delete(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        if self.running_record(spec).is_some() {
            return Err(DriverError::WrongState(format!(
                "container {} is running; stop it first",
                spec.name
            )));
        }
        self.cleanup_host(spec).await?;
        let l = Layout::of(spec);
        if mounts::is_mount_point(&l.rootfs) {
            return Err(DriverError::WrongState(format!(
                "{} is still mounted",
                l.rootfs.display()
            )));
        }
        for dir in [&spec.paths.volume, &spec.paths.run, &spec.paths.logs] {
            remove_if_exists(dir).map_err(DriverError::io(format!("remove {}", dir.display())))?;
        }
        Ok(())
    }
}

impl ContainerDriver {
    /// Bind the rootfs, run the forkstart helper, and return the init's record.
    async fn spawn_init(
        &self,
        spec: &InstanceSpec,
        l: &Layout,
        cg: Option<&Cgroup>,
        ctx: &OpCtx,
    ) -> Result<InitRecord, DriverError> {
        l.bind_rootfs()?;
        ctx.check_cancelled("start (nothing was started)")?;
        ctx.progress("stage", "starting container init");
        let args = ForkstartArgs {
            name: spec.name.clone(),
            rootfs: l
                .rootfs
                .canonicalize()
                .map_err(DriverError::io(format!("resolve {}", l.rootfs.display())))?,
            pidfile: std::path::absolute(&l.pidfile).map_err(DriverError::io("resolve pidfile"))?,
            cgroup_procs: cg.map(|c| c.procs_files()).unwrap_or_default(),
        };
        let child = tokio::process::Command::new(&self.helper)
            .arg("forkstart")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let helper = self.helper.display().to_string();
        let out = tokio::time::timeout(self.timeouts.start, child)
            .await
            .map_err(|_| {
                DriverError::Timeout(format!(
                    "{helper} forkstart did not finish in {:?}",
                    self.timeouts.start
                ))
            })?
            .map_err(DriverError::io(format!("run {helper} forkstart")))?;
        if !out.status.success() {
            return Err(DriverError::Command {
                program: format!("{helper} forkstart"),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let rec = InitRecord::read(&l.pidfile).ok_or_else(|| {
            DriverError::WrongState(format!(
                "forkstart wrote no pidfile at {}",
                l.pidfile.display()
            ))
        })?;
        if !procfs::check_running(&rec) {
            return Err(DriverError::WrongState(format!(
                "container init {} exited right after start; check {}/sbin/init",
                rec.pid,
                l.volume_rootfs.display()
            )));
        }
        Ok(rec)
    }
}
