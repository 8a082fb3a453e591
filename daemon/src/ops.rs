//! Operations: long-running work tracked in memory, as Incus does.
//!
//! Every async API call creates an [`Op`] whose task runs on tokio. The task
//! always ends (Success, Failure or Cancelled); each change is published on
//! the events bus and wakes `/wait` callers. Progress written by drivers goes
//! into the operation's metadata.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::EventBus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    Running,
    Cancelling,
    Success,
    Failure,
    Cancelled,
}

impl OpStatus {
    pub fn code(self) -> u16 {
        match self {
            OpStatus::Running => 103,
            OpStatus::Cancelling => 104,
            OpStatus::Success => 200,
            OpStatus::Failure => 400,
            OpStatus::Cancelled => 401,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OpStatus::Running => "Running",
            OpStatus::Cancelling => "Cancelling",
            OpStatus::Success => "Success",
            OpStatus::Failure => "Failure",
            OpStatus::Cancelled => "Cancelled",
        }
    }
    pub fn is_final(self) -> bool {
        self.code() >= 200
    }
}

/// How an operation's work ended.
pub enum Outcome {
    Done(Map<String, Value>),
    Failed(String),
    Cancelled(String),
}

struct OpData {
    description: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    status: OpStatus,
    resources: Value,
    metadata: Map<String, Value>,
    may_cancel: bool,
    err: String,
}

pub struct Op {
    pub id: String,
    location: String,
    data: Mutex<OpData>,
    cancel: CancellationToken,
    version: watch::Sender<u64>,
    events: EventBus,
}

impl Op {
    pub fn to_json(&self) -> Value {
        let d = self.data.lock().unwrap();
        json!({
            "id": self.id,
            "class": "task",
            "description": d.description,
            "created_at": d.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "updated_at": d.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "status": d.status.name(),
            "status_code": d.status.code(),
            "resources": d.resources,
            "metadata": d.metadata,
            "may_cancel": d.may_cancel && !d.status.is_final(),
            "err": d.err,
            "location": self.location,
        })
    }

    pub fn status(&self) -> OpStatus {
        self.data.lock().unwrap().status
    }

    fn changed(&self) {
        self.data.lock().unwrap().updated_at = Utc::now();
        self.version.send_modify(|v| *v += 1);
        self.events.send_operation(&self.to_json());
    }

    /// Set one metadata key (progress); publishes an event.
    pub fn set_meta(&self, key: &str, value: Value) {
        self.data
            .lock()
            .unwrap()
            .metadata
            .insert(key.to_string(), value);
        self.changed();
    }

    fn finish(&self, outcome: Outcome) {
        {
            let mut d = self.data.lock().unwrap();
            match outcome {
                Outcome::Done(meta) => {
                    d.metadata.extend(meta);
                    d.status = OpStatus::Success;
                }
                Outcome::Failed(err) => {
                    d.status = OpStatus::Failure;
                    d.err = err;
                }
                Outcome::Cancelled(err) => {
                    d.status = OpStatus::Cancelled;
                    d.err = err;
                }
            }
            d.metadata.remove("stage");
        }
        self.changed();
    }

    /// Request cancellation. Errors name why it cannot be cancelled.
    pub fn cancel(&self) -> Result<(), String> {
        {
            let mut d = self.data.lock().unwrap();
            if d.status.is_final() {
                return Err(format!(
                    "operation {} has already finished ({})",
                    self.id,
                    d.status.name()
                ));
            }
            if !d.may_cancel {
                return Err(format!(
                    "operation {} ({}) cannot be cancelled at this stage",
                    self.id, d.description
                ));
            }
            d.status = OpStatus::Cancelling;
        }
        self.cancel.cancel();
        self.changed();
        Ok(())
    }

    /// Wait until final or until `timeout` passes (None = no limit).
    pub async fn wait(&self, timeout: Option<std::time::Duration>) {
        let mut rx = self.version.subscribe();
        let fut = async {
            while !self.status().is_final() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        match timeout {
            Some(t) => {
                let _ = tokio::time::timeout(t, fut).await;
            }
            None => fut.await,
        }
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Forbid cancellation from now on (past the point of no return).
    pub fn set_cancellable(&self, may: bool) {
        self.data.lock().unwrap().may_cancel = may;
        self.changed();
    }
}

/// Registry of this member's operations.
#[derive(Clone)]
pub struct Operations {
    map: Arc<Mutex<HashMap<String, Arc<Op>>>>,
    events: EventBus,
    location: String,
}

/// Keep finished operations this long, as Incus does, so clients can read results.
const KEEP_FINISHED: std::time::Duration = std::time::Duration::from_secs(300);

impl Operations {
    pub fn new(events: EventBus, location: String) -> Self {
        Operations {
            map: Default::default(),
            events,
            location,
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Op>> {
        self.map.lock().unwrap().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Op>> {
        let mut v: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|o| o.data.lock().unwrap().created_at);
        v
    }

    /// Create an operation and run `work` for it on a task. `work` gets the Op
    /// (for progress and the cancel token).
    pub fn spawn<F, Fut>(
        &self,
        description: &str,
        resources: Value,
        may_cancel: bool,
        work: F,
    ) -> Arc<Op>
    where
        F: FnOnce(Arc<Op>) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let now = Utc::now();
        let op = Arc::new(Op {
            id: uuid::Uuid::new_v4().to_string(),
            location: self.location.clone(),
            data: Mutex::new(OpData {
                description: description.to_string(),
                created_at: now,
                updated_at: now,
                status: OpStatus::Running,
                resources,
                metadata: Map::new(),
                may_cancel,
                err: String::new(),
            }),
            cancel: CancellationToken::new(),
            version: watch::channel(0).0,
            events: self.events.clone(),
        });
        self.map.lock().unwrap().insert(op.id.clone(), op.clone());
        self.events.send_operation(&op.to_json());
        let (task_op, map) = (op.clone(), self.map.clone());
        tokio::spawn(async move {
            let id = task_op.id.clone();
            // A panic in `work` must still end the operation.
            let outcome = match tokio::spawn(work(task_op.clone())).await {
                Ok(o) => o,
                Err(e) => Outcome::Failed(format!("internal error: {e}")),
            };
            if let Outcome::Failed(err) = &outcome {
                tracing::warn!(op = %id, error = %err, "operation failed");
            }
            task_op.finish(outcome);
            tokio::time::sleep(KEEP_FINISHED).await;
            map.lock().unwrap().remove(&id);
        });
        op
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn op_runs_to_success_and_wakes_waiters() {
        let ops = Operations::new(EventBus::new(), "m1".into());
        let op = ops.spawn("Testing", json!({}), false, |op| async move {
            op.set_meta("stage", json!("working"));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut m = Map::new();
            m.insert("return".into(), json!(0));
            Outcome::Done(m)
        });
        op.wait(None).await;
        let j = op.to_json();
        assert_eq!(j["status_code"], 200);
        assert_eq!(j["metadata"]["return"], 0);
        assert!(j["metadata"].get("stage").is_none());
    }

    #[tokio::test]
    async fn cancel_reaches_work_and_ends_cancelled() {
        let ops = Operations::new(EventBus::new(), "m1".into());
        let op = ops.spawn("Slow", json!({}), true, |op| async move {
            op.cancel_token().cancelled().await;
            Outcome::Cancelled("stopped early".into())
        });
        op.cancel().unwrap();
        op.wait(Some(std::time::Duration::from_secs(5))).await;
        assert_eq!(op.status(), OpStatus::Cancelled);
        assert!(op.cancel().unwrap_err().contains("already finished"));
    }

    #[tokio::test]
    async fn not_cancellable_is_refused_and_panics_end_the_op() {
        let ops = Operations::new(EventBus::new(), "m1".into());
        let op = ops.spawn("Boom", json!({}), false, |_op| async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            panic!("boom")
        });
        assert!(op.cancel().unwrap_err().contains("cannot be cancelled"));
        op.wait(Some(std::time::Duration::from_secs(5))).await;
        assert_eq!(op.status(), OpStatus::Failure);
    }
}
