//! Per-operation context handed to drivers: progress reporting and cancellation.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

type ProgressFn = dyn Fn(&str, &str) + Send + Sync;

/// Context of one long-running driver action.
///
/// `progress(key, value)` publishes a progress field in the operation's
/// metadata (e.g. `("stage", "dumping memory")`, `("state_progress", "12 MB")`).
/// Drivers check [`OpCtx::check_cancelled`] between steps and, when cancelled,
/// undo what they did so the instance is left exactly as it was.
#[derive(Clone)]
pub struct OpCtx {
    progress: Arc<ProgressFn>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for OpCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpCtx")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl OpCtx {
    pub fn new(
        progress: impl Fn(&str, &str) + Send + Sync + 'static,
        cancel: CancellationToken,
    ) -> Self {
        OpCtx {
            progress: Arc::new(progress),
            cancel,
        }
    }
    /// A context that reports nowhere and is never cancelled (tests, internal use).
    pub fn detached() -> Self {
        OpCtx::new(|_, _| {}, CancellationToken::new())
    }
    pub fn progress(&self, key: &str, value: &str) {
        (self.progress)(key, value)
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }
    /// Err(Cancelled) if cancellation was requested.
    pub fn check_cancelled(&self, what: &str) -> Result<(), crate::DriverError> {
        if self.is_cancelled() {
            Err(crate::DriverError::Cancelled(what.to_string()))
        } else {
            Ok(())
        }
    }
}
