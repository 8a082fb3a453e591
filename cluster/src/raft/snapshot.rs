//! Snapshot data: its byte format and the member's current snapshot on disk.
//!
//! Format version 1 (what travels to a follower and what `DIR/snapshots/current`
//! holds):
//!
//! ```text
//! ferry-snapshot v1\n           magic + format version
//! <SnapshotMeta as JSON>\n      last_log_id, last_membership, snapshot_id
//! <SQLite database file>        the state machine, made by `VACUUM INTO`
//! ```
//!
//! The database inside carries its own schema version (`schema` table), so an older
//! member's snapshot is upgraded when installed, and a newer one is refused.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openraft::{BasicNode, SnapshotMeta};

use super::NodeId;

pub(crate) type Meta = SnapshotMeta<NodeId, BasicNode>;

const MAGIC: &[u8] = b"ferry-snapshot v1\n";
const CURRENT: &str = "current";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid snapshot: {0}")]
    Format(String),
    #[error("snapshot metadata: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("snapshot database: {0}")]
    Db(#[from] ferry_db::DbError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Serializes a snapshot: header, metadata, database bytes.
pub(crate) fn encode(meta: &Meta, db: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let meta = serde_json::to_vec(meta)?;
    let mut data = Vec::with_capacity(MAGIC.len() + meta.len() + 1 + db.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&meta);
    data.push(b'\n');
    data.extend_from_slice(db);
    Ok(data)
}

/// Splits snapshot data into its metadata and database bytes.
pub(crate) fn decode(data: &[u8]) -> Result<(Meta, &[u8]), SnapshotError> {
    let rest = data.strip_prefix(MAGIC).ok_or_else(|| {
        let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
        SnapshotError::Format(format!(
            "unknown snapshot format {:?} (this ferry reads \"ferry-snapshot v1\"); \
             upgrade ferry on this member",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        ))
    })?;
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| SnapshotError::Format("metadata line is not terminated".into()))?;
    let meta = serde_json::from_slice(&rest[..end])?;
    Ok((meta, &rest[end + 1..]))
}

/// The member's current snapshot, kept in one file replaced atomically (write a
/// temporary file, fsync, rename, fsync the directory).
#[derive(Debug)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
    /// Serializes replacements, which come from the builder task and from installs.
    lock: Mutex<()>,
}

impl SnapshotStore {
    pub(crate) fn open(dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    /// A fresh path in the snapshot directory for temporary files.
    pub(crate) fn temp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{what}-{}-{n}.tmp", std::process::id()))
    }

    /// Makes `data` (with metadata `meta`) the current snapshot, unless the current one
    /// is already newer.
    pub(crate) fn save(&self, meta: &Meta, data: &[u8]) -> Result<(), SnapshotError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((current, _)) = self.load_unlocked()? {
            if current.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let tmp = self.temp_path("current");
        let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(data).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        let path = self.dir.join(CURRENT);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// The current snapshot's metadata and data, if there is one.
    pub(crate) fn load(&self) -> Result<Option<(Meta, Vec<u8>)>, SnapshotError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.load_unlocked()
    }

    fn load_unlocked(&self) -> Result<Option<(Meta, Vec<u8>)>, SnapshotError> {
        let path = self.dir.join(CURRENT);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let (meta, _) = decode(&data)?;
        Ok(Some((meta, data)))
    }

    /// Removes temporary files left by a crash.
    pub(crate) fn clean(&self) -> Result<(), SnapshotError> {
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_refuse_unknown_formats() {
        let meta = Meta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: "s1".into(),
        };
        let data = encode(&meta, b"SQLite format 3\0...").unwrap();
        let (decoded, db) = decode(&data).unwrap();
        assert_eq!(decoded, meta);
        assert_eq!(db, b"SQLite format 3\0...");

        let err = decode(b"ferry-snapshot v2\n{}\n").unwrap_err();
        assert!(err.to_string().contains("upgrade ferry"), "{err}");
        assert!(decode(b"ferry-snapshot v1\n{").is_err());
    }

    #[test]
    fn save_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        assert!(store.load().unwrap().is_none());
        let meta = |index: u64| Meta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 0),
                index,
            )),
            last_membership: Default::default(),
            snapshot_id: format!("s{index}"),
        };
        store
            .save(&meta(5), &encode(&meta(5), b"five").unwrap())
            .unwrap();
        store
            .save(&meta(3), &encode(&meta(3), b"three").unwrap())
            .unwrap();
        let (current, data) = store.load().unwrap().unwrap();
        assert_eq!(current, meta(5));
        assert_eq!(decode(&data).unwrap().1, b"five");
        store.clean().unwrap();
    }
}
