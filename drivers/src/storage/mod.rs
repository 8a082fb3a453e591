//! Streamed rootfs archives for the migration "filesystem" channel.
//!
//! [`write_archive`] walks a container rootfs and writes a self-delimiting
//! archive (format: `doc/archive-format.md`) to any `Write`; [`read_archive`]
//! extracts one from any `Read`. Both are blocking (run them in
//! `spawn_blocking` over a pipe); compression is the caller's business.
//!
//! Two passes make a move:
//! 1. a full pass while the container runs, with
//!    [`ArchiveOptions::record_manifest`]: the returned [`ArchiveStats::manifest`]
//!    records what the source saw of each path (its own inode, size, mtime,
//!    ctime — no clock of the target is involved);
//! 2. after the freeze, an incremental pass with [`ArchiveOptions::base`] set
//!    to that manifest: only entries whose source stat changed (or that were
//!    too recent to trust, see `write.rs`) are sent, plus deleted paths;
//!    [`read_archive`] applies it over the tree of the first pass.
//!
//! The archive is untrusted on extraction: paths are checked (relative, no
//! `..`, no NUL, bounded), every directory below `dest` is opened with
//! `O_NOFOLLOW` one component at a time, hard links must name an earlier
//! entry, device nodes need [`ExtractOptions::allow_devices`], sizes are
//! bounded. On error the destination is left partial: the caller deletes it.

mod format;
mod fsops;
mod read;
mod write;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_malicious;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

pub use format::{MIN_VERSION, VERSION};
pub use read::read_archive;
pub use write::{write_archive, Manifest};

/// Live counters a caller can poll from another thread for progress.
#[derive(Debug, Default)]
pub struct Progress {
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl Progress {
    /// Entries written/extracted so far.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }
    /// File content bytes written/extracted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    pub(crate) fn add(p: &Option<Arc<Progress>>, entries: u64, bytes: u64) {
        if let Some(p) = p {
            p.entries.fetch_add(entries, Ordering::Relaxed);
            p.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// Options of [`write_archive`].
#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    /// Return a [`Manifest`] of everything seen (first pass of a move).
    pub record_manifest: bool,
    /// Incremental pass: send only what changed since this manifest (taken
    /// by a previous `write_archive` of the same root on this member), plus
    /// the paths deleted since.
    pub base: Option<Manifest>,
    /// Do not descend into directories on another filesystem (mount points
    /// are archived as empty directories, with a warning). Default true.
    pub one_file_system: bool,
    /// Send holes of sparse files as holes (SEEK_DATA/SEEK_HOLE). Default true.
    pub sparse: bool,
    pub progress: Option<Arc<Progress>>,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            record_manifest: false,
            base: None,
            one_file_system: true,
            sparse: true,
            progress: None,
        }
    }
}

/// Options of [`read_archive`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Create character and block devices; without it they are refused.
    pub allow_devices: bool,
    /// Longest accepted entry path in bytes (capped at 4096).
    pub max_path_len: usize,
    /// Most file bytes (data and holes) accepted in total.
    pub max_total_bytes: Option<u64>,
    /// Most entries (and deletions) accepted.
    pub max_entries: Option<u64>,
    /// `syncfs` the destination's filesystem once everything is applied, so
    /// a successful return means the tree is durable (the source may delete
    /// its copy afterwards). Default true.
    pub sync: bool,
    pub progress: Option<Arc<Progress>>,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            allow_devices: false,
            max_path_len: 4096,
            max_total_bytes: None,
            max_entries: None,
            sync: true,
            progress: None,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct ArchiveStats {
    /// Entries written/extracted (root, dirs, files, links, nodes).
    pub entries: u64,
    /// File content bytes (holes not counted).
    pub bytes: u64,
    /// Deleted paths sent/applied (incremental passes).
    pub deleted: u64,
    /// Size of the archive stream itself.
    pub archive_bytes: u64,
    /// Things skipped: sockets, mount points, xattrs the destination refused,
    /// files that changed type while being read.
    pub warnings: Vec<String>,
    /// With [`ArchiveOptions::record_manifest`]: the base for the next pass.
    pub manifest: Option<Manifest>,
}

/// Failure of [`write_archive`] or [`read_archive`]. Entry paths are shown
/// relative to the root, non-UTF-8 bytes escaped.
#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("not a ferry rootfs archive (magic {found:?})")]
    BadMagic { found: String },
    #[error(
        "unsupported archive format version {found} (this member reads versions {min} to {max})"
    )]
    UnsupportedVersion { found: u16, min: u16, max: u16 },
    #[error("archive truncated while reading {context}")]
    Truncated { context: String },
    #[error("malformed archive at {context}: {reason}")]
    Malformed { context: String, reason: String },
    #[error("refused unsafe entry `{path}`: {reason}")]
    Unsafe { path: String, reason: String },
    #[error("refused device node `{path}`: device nodes are not allowed (ExtractOptions::allow_devices)")]
    DeviceNotAllowed { path: String },
    #[error("archive exceeds a limit at `{path}`: {what}")]
    Limit { path: String, what: String },
    #[error("archive trailer mismatch: it declares {declared} {what}, the stream carried {seen}")]
    Trailer {
        what: &'static str,
        declared: u64,
        seen: u64,
    },
    #[error("destination {dest}: {reason}")]
    Destination { dest: String, reason: String },
    #[error("`{path}`: {op}: {source}")]
    Io {
        path: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// Writing the archive to the output stream failed (peer gone, pipe closed).
    #[error("archive stream: {0}")]
    Stream(#[source] std::io::Error),
}

impl ArchiveError {
    pub(crate) fn io(path: &[u8], op: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let path = format::show(path);
        let op = op.into();
        move |source| ArchiveError::Io { path, op, source }
    }
}
