//! The write path callers use.

use std::sync::Arc;

use crate::{Command, Db, DbError};

/// Where commands are submitted. Today it applies them to the local database; the
/// cluster work adds a raft variant that forwards to the leader and returns once the
/// command is committed and applied locally. Callers do not change.
#[derive(Clone, Debug)]
pub enum Writer {
    Local(Arc<Db>),
}

impl Writer {
    /// Applies `cmd` and returns the applied index it got.
    pub async fn submit(&self, cmd: Command) -> Result<u64, DbError> {
        match self {
            Writer::Local(db) => {
                let db = Arc::clone(db);
                // A commit fsyncs (synchronous=FULL): keep it off the async workers.
                match tokio::task::spawn_blocking(move || db.apply(&cmd)).await {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => Err(DbError::Conflict(
                        "the write was cancelled because ferryd is shutting down; retry once it is back".into(),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_submit_applies() {
        let db = Arc::new(Db::open_in_memory().unwrap());
        let writer = Writer::Local(Arc::clone(&db));
        let err = writer
            .submit(Command::DeleteInstance { name: "c1".into() })
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }));
        assert_eq!(db.applied_index().unwrap(), 0);
    }

    #[test]
    fn db_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Db>();
        check::<Writer>();
    }
}
