//! Spinner for long operations.

use std::io::IsTerminal;
use std::time::Duration;

use ferry_client::Operation;
use indicatif::{ProgressBar, ProgressStyle};

/// One-line progress text: description, stage and `*_progress` values.
pub fn progress_text(op: &Operation) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !op.description.is_empty() {
        parts.push(op.description.clone());
    }
    if let Some(stage) = op.stage().filter(|s| !s.is_empty()) {
        parts.push(stage.to_string());
    }
    let values: Vec<&str> = op.progress_values().into_iter().map(|(_, v)| v).collect();
    let mut text = parts.join(": ");
    if !values.is_empty() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push('(');
        text.push_str(&values.join(", "));
        text.push(')');
    }
    text
}

/// A spinner on stderr, hidden when stderr is not a terminal.
pub struct Spinner {
    bar: ProgressBar,
}

impl Spinner {
    pub fn new(initial: &str) -> Spinner {
        Self::with_visibility(initial, std::io::stderr().is_terminal())
    }

    /// A spinner that never draws (for commands whose output must stay clean).
    pub fn hidden() -> Spinner {
        Self::with_visibility("", false)
    }

    fn with_visibility(initial: &str, visible: bool) -> Spinner {
        let bar = if visible {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(initial.to_string());
        Spinner { bar }
    }

    /// Show the operation's current progress.
    pub fn update(&self, op: &Operation) {
        let text = progress_text(op);
        if !text.is_empty() {
            self.bar.set_message(text);
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(v: serde_json::Value) -> Operation {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn text_has_description_stage_and_progress() {
        let o = op(json!({"description": "Stopping instance",
            "metadata": {"stage": "dumping memory (CRIU)", "dump_progress": "40%", "other": 1, "fs_progress": 7}}));
        assert_eq!(
            progress_text(&o),
            "Stopping instance: dumping memory (CRIU) (40%)"
        );
        let o = op(json!({"description": "Creating instance",
            "metadata": {"unpack_progress": "12.0 MB", "download_progress": "100%"}}));
        assert_eq!(progress_text(&o), "Creating instance (100%, 12.0 MB)");
        let o = op(json!({"description": "Starting instance", "metadata": null}));
        assert_eq!(progress_text(&o), "Starting instance");
    }

    #[test]
    fn hidden_spinner_is_harmless() {
        let s = Spinner::hidden();
        s.update(&op(json!({"description": "x"})));
    }
}
