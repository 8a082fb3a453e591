//! `ferry cluster evacuate|restore`: empty a member for maintenance and bring
//! its instances back (doc/evacuation.md).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Result};
use ferry_client::Method;
use serde_json::{json, Value};

use crate::cli::{EvacuateAction, EvacuateArgs, RestoreArgs};
use crate::ctx::Ctx;
use crate::output::{pretty_json, print_out, render_table, type_label};

/// Columns of the per-instance report.
pub const REPORT_HEADERS: [&str; 9] = [
    "NAME", "TYPE", "FROM", "TO", "ACTION", "STATUS", "PATH", "DOWNTIME", "ERROR",
];

/// Evacuate or restore: the words each one is told with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Evacuate,
    Restore,
}

impl Job {
    /// `evacuate` / `restore` (also the request's `action`).
    pub fn verb(self) -> &'static str {
        match self {
            Job::Evacuate => "evacuate",
            Job::Restore => "restore",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Job::Evacuate => "evacuated",
            Job::Restore => "restored",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Job::Evacuate => "Evacuating",
            Job::Restore => "Restoring",
        }
    }
}

/// The request's `mode` for `--action` (none: empty, the server's `auto`).
pub fn evacuate_mode(action: Option<EvacuateAction>) -> &'static str {
    match action {
        None => "",
        Some(EvacuateAction::Auto) => "auto",
        Some(EvacuateAction::LiveMigrate) => "live-migrate",
        Some(EvacuateAction::Migrate) => "migrate",
        Some(EvacuateAction::Stop) => "stop",
    }
}

/// The body of `POST /1.0/cluster/members/<member>/state` for an evacuation.
pub fn evacuate_body(a: &EvacuateArgs) -> Value {
    json!({"action": Job::Evacuate.verb(), "mode": evacuate_mode(a.action)})
}

/// The body of `POST /1.0/cluster/members/<member>/state` for a restore.
pub fn restore_body(a: &RestoreArgs) -> Value {
    let mode = if a.skip_instances { "skip" } else { "" };
    json!({"action": Job::Restore.verb(), "mode": mode})
}

/// Without `force`, ask on `prompt` and read the answer from `input`; only
/// `yes` goes ahead. When stdin is not a terminal (`interactive` false) there
/// is nobody to ask, so `--force` is required.
pub fn confirm(
    job: Job,
    member: &str,
    force: bool,
    interactive: bool,
    input: &mut dyn BufRead,
    prompt: &mut dyn Write,
) -> Result<()> {
    if force {
        return Ok(());
    }
    let verb = job.verb();
    if !interactive {
        bail!("Not asking whether to {verb} cluster member \"{member}\": stdin is not a terminal. Add --force to {verb} it without confirmation");
    }
    write!(
        prompt,
        "Are you sure you want to {verb} cluster member \"{member}\"? (yes/no) [default=no]: "
    )?;
    prompt.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    if !answer.trim().eq_ignore_ascii_case("yes") {
        bail!(
            "Aborted: cluster member \"{member}\" was not {}",
            job.done()
        );
    }
    Ok(())
}

/// The report's finished instances (`evacuation.instances`) as table rows,
/// in completion order.
pub fn report_rows(report: &Value) -> Vec<Vec<String>> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let instances = report["instances"].as_array().map(Vec::as_slice);
    instances
        .unwrap_or_default()
        .iter()
        .map(|i| {
            vec![
                s(&i["name"]),
                type_label(i["type"].as_str().unwrap_or_default()),
                s(&i["from"]),
                s(&i["to"]),
                s(&i["action"]),
                s(&i["status"]).to_uppercase(),
                s(&i["path"]),
                i["downtime_ms"]
                    .as_u64()
                    .map(|d| format!("{d}ms"))
                    .unwrap_or_default(),
                s(&i["error"]).replace('\n', " "),
            ]
        })
        .collect()
}

/// What goes to stdout once the operation ended: the `evacuation` object as
/// JSON, or the table of finished instances (nothing when there are none).
pub fn report_text(report: &Value, json: bool) -> String {
    if json {
        return pretty_json(report);
    }
    let rows = report_rows(report);
    if rows.is_empty() {
        return String::new();
    }
    render_table(&REPORT_HEADERS, &rows)
}

/// The line on stderr after a successful run, e.g.
/// `Member m1 evacuated: 3 instances moved, 1 stopped`.
pub fn summary(job: Job, member: &str, report: &Value) -> String {
    const ORDER: [&str; 6] = [
        "moved",
        "stopped",
        "started",
        "unchanged",
        "failed",
        "skipped",
    ];
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for i in report["instances"].as_array().into_iter().flatten() {
        let status = i["status"].as_str().unwrap_or("?");
        match counts.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => counts.push((status, 1)),
        }
    }
    let rank = |s: &str| ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len());
    counts.sort_by_key(|(s, _)| rank(s));
    let mut text = format!("Member {member} {}", job.done());
    for (k, (status, n)) in counts.iter().enumerate() {
        text.push_str(if k == 0 { ": " } else { ", " });
        if k == 0 {
            let plural = if *n == 1 { "" } else { "s" };
            text.push_str(&format!("{n} instance{plural} {status}"));
        } else {
            text.push_str(&format!("{n} {status}"));
        }
    }
    text
}

/// `ferry cluster evacuate MEMBER [--action A] [--force]`.
pub async fn evacuate(ctx: &Ctx, a: &EvacuateArgs) -> Result<i32> {
    change_state(ctx, Job::Evacuate, &a.member, a.force, evacuate_body(a)).await
}

/// `ferry cluster restore MEMBER [--skip-instances] [--force]`.
pub async fn restore(ctx: &Ctx, a: &RestoreArgs) -> Result<i32> {
    change_state(ctx, Job::Restore, &a.member, a.force, restore_body(a)).await
}

async fn change_state(ctx: &Ctx, job: Job, member: &str, force: bool, body: Value) -> Result<i32> {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    confirm(
        job,
        member,
        force,
        interactive,
        &mut stdin.lock(),
        &mut std::io::stderr(),
    )?;
    let path = format!("/1.0/cluster/members/{member}/state");
    let what = format!("{} cluster member {member}", job.doing());
    let op = ctx
        .run_op_to_end(Method::POST, &path, Some(&body), &what)
        .await?;
    // The report first, also when some instance failed; then the error.
    let report = &op.metadata["evacuation"];
    print_out(&report_text(report, ctx.json()));
    let op = op.into_result()?;
    eprintln!("{}", summary(job, member, &op.metadata["evacuation"]));
    Ok(0)
}

#[cfg(test)]
#[path = "cmd_evacuate_tests.rs"]
mod tests;
