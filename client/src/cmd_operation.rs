//! `ferry operation list|show|cancel`.

use std::fmt::Write as _;

use anyhow::Result;
use ferry_client::{operation_id, operations_from_metadata, Operation};

use crate::cli::OperationCommand;
use crate::ctx::Ctx;
use crate::output::{format_time, print_out, render_table, value_text};

pub async fn run(ctx: &Ctx, cmd: &OperationCommand) -> Result<i32> {
    match cmd {
        OperationCommand::List => list(ctx).await,
        OperationCommand::Show { id } => show(ctx, id).await,
        OperationCommand::Cancel { id } => {
            ctx.client.cancel_operation(id).await?;
            Ok(0)
        }
    }
}

pub fn list_rows(ops: &[Operation]) -> Vec<Vec<String>> {
    ops.iter()
        .map(|op| {
            vec![
                op.id.clone(),
                op.description.clone(),
                op.status.to_uppercase(),
                format_time(&op.created_at),
            ]
        })
        .collect()
}

async fn list(ctx: &Ctx) -> Result<i32> {
    let env = ctx.client.get("/1.0/operations?recursion=1").await?;
    if ctx.json() {
        ctx.print_json(&env.metadata);
        return Ok(0);
    }
    let ops = operations_from_metadata(env.metadata)?;
    print_out(&render_table(
        &["ID", "DESCRIPTION", "STATUS", "CREATED"],
        &list_rows(&ops),
    ));
    Ok(0)
}

/// The human form of `ferry operation show`.
pub fn show_text(op: &Operation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "ID: {}", op.id);
    let _ = writeln!(s, "Class: {}", op.class);
    let _ = writeln!(s, "Description: {}", op.description);
    let _ = writeln!(s, "Status: {}", op.status);
    let _ = writeln!(s, "Created: {}", format_time(&op.created_at));
    let _ = writeln!(s, "Updated: {}", format_time(&op.updated_at));
    let _ = writeln!(s, "May cancel: {}", op.may_cancel);
    if !op.location.is_empty() {
        let _ = writeln!(s, "Location: {}", op.location);
    }
    if !op.err.is_empty() {
        let _ = writeln!(s, "Err: {}", op.err);
    }
    if !op.resources.is_empty() {
        s.push_str("Resources:\n");
        for (kind, urls) in &op.resources {
            let _ = writeln!(s, "  {kind}:");
            for url in urls {
                let _ = writeln!(s, "  - {url}");
            }
        }
    }
    if let Some(meta) = op.metadata.as_object().filter(|m| !m.is_empty()) {
        s.push_str("Metadata:\n");
        for (k, v) in meta {
            let _ = writeln!(s, "  {k}: {}", value_text(v));
        }
    }
    s
}

async fn show(ctx: &Ctx, id: &str) -> Result<i32> {
    let env = ctx
        .client
        .get(&format!("/1.0/operations/{}", operation_id(id)))
        .await?;
    if ctx.json() {
        ctx.print_json(&env.metadata);
        return Ok(0);
    }
    let op: Operation = env.decode()?;
    print_out(&show_text(&op));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Operation {
        serde_json::from_value(
            json!({"id":"6916c8a6-9b7d-4abd-90b3-aedfec7ec7da","class":"task",
            "description":"Stopping instance","created_at":"2026-11-22T01:00:00Z",
            "updated_at":"2026-11-22T01:00:05Z","status":"Running","status_code":103,
            "resources":{"instances":["/1.0/instances/c1"]},
            "metadata":{"stage":"dumping memory (CRIU)","progress":"40%"},
            "may_cancel":true,"err":"","location":"none"}),
        )
        .unwrap()
    }

    #[test]
    fn rows() {
        let rows = list_rows(&[sample()]);
        assert_eq!(
            rows,
            vec![vec![
                "6916c8a6-9b7d-4abd-90b3-aedfec7ec7da".to_string(),
                "Stopping instance".into(),
                "RUNNING".into(),
                "2026/11/22 01:00 UTC".into()
            ]]
        );
    }

    #[test]
    fn show() {
        let t = show_text(&sample());
        assert!(
            t.starts_with("ID: 6916c8a6-9b7d-4abd-90b3-aedfec7ec7da\nClass: task\n"),
            "{t}"
        );
        assert!(t.contains("Status: Running\n"));
        assert!(t.contains("May cancel: true\n"));
        assert!(t.contains("Resources:\n  instances:\n  - /1.0/instances/c1\n"));
        assert!(t.contains("Metadata:\n  progress: 40%\n  stage: dumping memory (CRIU)\n"));
        assert!(!t.contains("Err:"));
    }
}
