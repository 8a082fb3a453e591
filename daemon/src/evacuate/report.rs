//! The per-instance report an evacuation or restore keeps in its operation.

use std::collections::BTreeMap;

use ferry_db::InstanceRecord;
use serde::Serialize;
use serde_json::{json, Value};

use super::{Action, Mode};

/// One finished instance.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub from: String,
    pub to: String,
    pub action: String,
    /// moved | stopped | started | unchanged | failed | skipped
    pub status: String,
    pub path: String,
    pub downtime_ms: Option<u64>,
    pub total_ms: u64,
    pub error: String,
}

impl Entry {
    pub fn new(rec: &InstanceRecord, action: &str, status: &str) -> Entry {
        Entry {
            name: rec.name.clone(),
            kind: rec.kind.clone(),
            from: rec.member.clone(),
            to: String::new(),
            action: action.into(),
            status: status.into(),
            path: String::new(),
            downtime_ms: None,
            total_ms: 0,
            error: String::new(),
        }
    }

    pub fn error(mut self, e: impl Into<String>) -> Entry {
        self.error = e.into();
        self
    }

    /// The same instance as a move under way.
    pub fn current(&self) -> Current {
        Current {
            name: self.name.clone(),
            kind: self.kind.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            action: self.action.clone(),
            phase: String::new(),
            move_progress: String::new(),
        }
    }
}

/// A move under way.
#[derive(Debug, Clone, Serialize)]
pub struct Current {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub from: String,
    pub to: String,
    pub action: String,
    pub phase: String,
    pub move_progress: String,
}

#[derive(Debug)]
pub struct Report {
    pub member: String,
    pub action: Action,
    pub mode: Mode,
    pub parallel: usize,
    /// Each move's share of the member's `--migration-bandwidth` (bytes/s).
    pub bandwidth_per_move: Option<u64>,
    pub total: usize,
    pub instances: Vec<Entry>,
    pub current: BTreeMap<String, Current>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            member: String::new(),
            action: Action::Evacuate,
            mode: Mode::Auto,
            parallel: 0,
            bandwidth_per_move: None,
            total: 0,
            instances: vec![],
            current: BTreeMap::new(),
        }
    }
}

impl Report {
    pub fn finish(&mut self, entry: Entry) {
        self.current.remove(&entry.name);
        self.instances.push(entry);
    }

    fn failed(&self) -> usize {
        self.instances
            .iter()
            .filter(|e| e.status == "failed")
            .count()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "member": self.member, "action": self.action, "mode": self.mode,
            "parallel": self.parallel, "bandwidth_per_move": self.bandwidth_per_move,
            "total": self.total,
            "done": self.instances.len(), "failed": self.failed(),
            "instances": self.instances,
            "current": self.current.values().collect::<Vec<_>>(),
        })
    }

    /// `"2/4 instances done; moving v1 to m3 (memory 40%)"`.
    pub fn progress_line(&self) -> String {
        let mut s = format!("{}/{} instances done", self.instances.len(), self.total);
        let failed = self.failed();
        if failed > 0 {
            s.push_str(&format!(" ({failed} failed)"));
        }
        let moving: Vec<String> = self
            .current
            .values()
            .map(|c| {
                let detail = if c.move_progress.is_empty() {
                    c.phase.clone()
                } else {
                    c.move_progress.clone()
                };
                if detail.is_empty() {
                    format!("{} to {}", c.name, c.to)
                } else {
                    format!("{} to {} ({detail})", c.name, c.to)
                }
            })
            .collect();
        if !moving.is_empty() {
            s.push_str("; moving ");
            s.push_str(&moving.join(", "));
        }
        s
    }

    /// `"3 moved, 1 failed, 0 skipped"`.
    pub fn summary(&self) -> String {
        let count = |st: &str| self.instances.iter().filter(|e| e.status == st).count();
        format!(
            "{} moved, {} stopped, {} failed, {} skipped",
            count("moved"),
            count("stopped"),
            count("failed"),
            count("skipped")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_and_json_follow_the_moves() {
        let rec = InstanceRecord {
            name: "c1".into(),
            kind: "container".into(),
            member: "m1".into(),
            status: "Running".into(),
            storage_pool: "default".into(),
            image: String::new(),
            description: String::new(),
            config: Default::default(),
            volatile: Default::default(),
            created_at: String::new(),
            last_used_at: String::new(),
        };
        let mut r = Report {
            total: 2,
            ..Default::default()
        };
        let mut e = Entry::new(&rec, "live-migrate", "moved");
        e.to = "m2".into();
        let mut c = e.current();
        c.move_progress = "memory: 40%".into();
        r.current.insert("c1".into(), c);
        assert_eq!(
            r.progress_line(),
            "0/2 instances done; moving c1 to m2 (memory: 40%)"
        );
        r.finish(e);
        let mut v = Entry::new(&rec, "live-migrate", "failed").error("boom");
        v.name = "v1".into();
        r.finish(v);
        assert_eq!(r.progress_line(), "2/2 instances done (1 failed)");
        let j = r.to_json();
        assert_eq!(j["done"], 2);
        assert_eq!(j["failed"], 1);
        assert_eq!(j["instances"][0]["to"], "m2");
        assert_eq!(j["instances"][1]["error"], "boom");
        assert_eq!(j["action"], "evacuate");
        assert_eq!(j["current"], json!([]));
    }
}
