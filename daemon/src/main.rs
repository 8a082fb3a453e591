//! `ferryd`: the ferry daemon. One per cluster member.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

mod api;
mod cluster;
mod core;
mod evacuate;
mod events;
mod exec_ws;
mod instance_put;
mod migrate;
mod ops;
mod server;
mod settings;
mod tls;

#[derive(Parser, Debug)]
#[command(
    name = "ferryd",
    version,
    about = "ferry daemon: manages and moves containers and VMs"
)]
struct Args {
    /// Data directory: database, instances, logs, certificates and `unix.socket`.
    #[arg(long, env = "FERRY_DIR", default_value = "/var/lib/ferry")]
    dir: PathBuf,
    /// HTTPS address to listen on (e.g. 127.0.0.1:8443). Unset: unix socket only.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// This member's name (defaults to the host name).
    #[arg(long)]
    name: Option<String>,
    /// Highest migration protocol version this member speaks: `2` (current)
    /// or `1`/`previous` while older members remain during a rolling
    /// upgrade (moves then use a stateful stop instead of a live transfer).
    #[arg(long, env = "FERRY_MIGRATION_PROTOCOL", default_value = "current",
          value_parser = settings::Settings::parse_protocol)]
    migration_protocol: ferry_migration::VersionRange,
    /// Default bandwidth cap for moves from this member (e.g. `100MiB`, per
    /// second); a move's own `--bandwidth` wins. Unset: unlimited.
    #[arg(long, env = "FERRY_MIGRATION_BANDWIDTH", value_parser = settings::Settings::parse_bandwidth)]
    migration_bandwidth: Option<u64>,
    /// QEMU's multifd (parallel RAM channels) on live VM moves from and to
    /// this member: `auto` (on a move without a bandwidth cap or post-copy,
    /// where both members' QEMU is 8.0 or later), `off`, or `always` (on a
    /// capped move too, instead of XBZRLE).
    #[arg(long, env = "FERRY_MULTIFD", default_value = "auto",
          value_parser = settings::Multifd::parse)]
    migration_multifd: settings::Multifd,
    /// Where the `shared` storage pool (a directory every member sees) is
    /// mounted on this member. Unset: no shared pool here.
    #[arg(long, env = "FERRY_SHARED_POOL")]
    shared_pool: Option<PathBuf>,
    /// How many instances `ferry cluster evacuate`/`restore` of this member
    /// moves at once (the member's migration bandwidth is shared among them).
    #[arg(long, env = "FERRY_EVACUATE_PARALLEL", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    evacuate_parallel: u16,
    /// Memory this member offers to instances (e.g. `8GiB`): placement counts
    /// the running instances' memory against it. Unset: the host's available
    /// memory is the only limit.
    #[arg(long, env = "FERRY_INSTANCE_MEMORY", value_parser = settings::Settings::parse_memory)]
    instance_memory: Option<u64>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,ferryd=debug`.
    #[arg(long, env = "FERRY_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    // Helper entry points re-executed by drivers: they must run before any
    // thread exists (they fork and enter namespaces).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("forkstart") {
        std::process::exit(ferry_drivers::container::forkstart_main(&argv[2..]));
    }
    cloexec_inherited_fds();
    keep_freed_memory();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file (the demo's, the tests',
        // systemd's journal) stays plain text that grep can match.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let settings = settings::Settings {
        migration_protocol: args.migration_protocol,
        migration_bandwidth: args.migration_bandwidth,
        migration_multifd: args.migration_multifd,
        shared_pool: args.shared_pool,
        evacuate_parallel: args.evacuate_parallel.into(),
        instance_memory: args.instance_memory,
    };
    let daemon = core::Daemon::open(args.dir.clone(), name, args.listen, settings)
        .await
        .with_context(|| format!("cannot open ferry data dir {}", args.dir.display()))?;
    server::serve(daemon, args.listen).await
}

/// Fixed malloc thresholds for the bulk paths (a move relays its pages,
/// disk and images in frames of up to 256 KiB). glibc's defaults move with
/// what was last freed: big buffers come from `mmap` and go back with
/// `munmap`, and a thread arena gives its freed top back with
/// `madvise(MADV_DONTNEED)` once it passes the trim threshold. Each new frame
/// then faults in and zeroes fresh pages. With buffers below 4 MiB taken
/// from the arenas, and up to 32 MiB of freed memory kept per arena, a move
/// reuses the same memory. This showed in CPU profiles of a container move:
/// the page-fault samples of the ferryd that receives fell by about 60 %.
/// `FERRY_MALLOC_TRIM_MIB=0` keeps glibc's defaults, for comparisons.
fn keep_freed_memory() {
    let trim_mib: i32 = std::env::var("FERRY_MALLOC_TRIM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    #[cfg(target_env = "gnu")]
    if trim_mib > 0 {
        // SAFETY: mallopt(3) with constant parameters, before any thread
        // other than this one exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim_mib.min(1024) << 20);
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = trim_mib;
}

/// Descriptors ferryd inherited from whoever started it (a shell's saved
/// fds, a pipe) must not leak into containers, QEMU or CRIU: a container
/// holding a host file open cannot be checkpointed ("Can't lookup mount").
fn cloexec_inherited_fds() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        if let Ok(bits) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = FdFlag::from_bits_truncate(bits) | FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
        }
    }
}
