//! The events bus behind `GET /1.0/events`.

use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<String>,
    location: String,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        Self::with_location(String::new())
    }
    pub fn with_location(location: String) -> Self {
        EventBus {
            tx: broadcast::channel(1024).0,
            location,
        }
    }
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }
    fn send(&self, kind: &str, metadata: &Value) {
        let ev = json!({
            "type": kind,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "location": self.location,
            "project": "default",
            "metadata": metadata,
        });
        let _ = self.tx.send(ev.to_string());
    }
    pub fn send_operation(&self, op: &Value) {
        self.send("operation", op)
    }
    /// Instance lifecycle event, e.g. `instance-started`.
    pub fn send_lifecycle(&self, action: &str, instance: &str) {
        self.send(
            "lifecycle",
            &json!({
                "action": action,
                "source": format!("/1.0/instances/{instance}"),
                "context": {},
            }),
        )
    }
}
