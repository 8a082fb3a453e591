//! Instance commands: launch, list, info, start, stop, restart, delete,
//! exec, console.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Result};
use ferry_client::{ClientError, InstanceFull, Method, Operation};
use serde_json::{json, Value};

use crate::cli::{ConsoleArgs, DeleteArgs, ExecArgs, LaunchArgs, RestartArgs, StopArgs};
use crate::ctx::Ctx;
use crate::output::{format_bytes, format_time, print_out, render_table, type_label};
use crate::progress::Spinner;

/// Exit code of a successful command.
const OK: i32 = 0;

/// The body of `POST /1.0/instances`.
pub fn launch_body(args: &LaunchArgs) -> Value {
    let config: BTreeMap<&str, &str> = args
        .config
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut body = json!({
        "name": args.name,
        "type": if args.vm { "virtual-machine" } else { "container" },
        "source": {"type": "image", "alias": args.image},
        "config": config,
        "start": !args.no_start,
    });
    if let Some(pool) = &args.storage {
        body["devices"] = json!({"root": {"type": "disk", "path": "/", "pool": pool}});
    }
    body
}

pub async fn launch(ctx: &Ctx, args: &LaunchArgs) -> Result<i32> {
    let verb = if args.no_start {
        "Creating"
    } else {
        "Launching"
    };
    eprintln!("{verb} {}", args.name);
    let what = format!("{verb} {}", args.name);
    let path = match &args.target {
        Some(t) => format!("/1.0/instances?target={t}"),
        None => "/1.0/instances".to_string(),
    };
    ctx.run_op(Method::POST, &path, Some(&launch_body(args)), &what)
        .await?;
    Ok(OK)
}

pub fn list_rows(instances: &[InstanceFull]) -> Vec<Vec<String>> {
    let mut sorted: Vec<&InstanceFull> = instances.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .into_iter()
        .map(|i| {
            let pid = i.state.as_ref().map(|s| s.pid).filter(|p| *p > 0);
            vec![
                i.name.clone(),
                type_label(&i.r#type),
                i.status.to_uppercase(),
                pid.map(|p| p.to_string()).unwrap_or_default(),
                i.location.clone(),
            ]
        })
        .collect()
}

pub async fn list(ctx: &Ctx) -> Result<i32> {
    let env = ctx.client.get("/1.0/instances?recursion=2").await?;
    if ctx.json() {
        ctx.print_json(&env.metadata);
        return Ok(OK);
    }
    let instances: Vec<InstanceFull> = env.decode()?;
    print_out(&render_table(
        &["NAME", "TYPE", "STATUS", "PID", "LOCATION"],
        &list_rows(&instances),
    ));
    Ok(OK)
}

/// The human form of `ferry info`.
pub fn info_text(i: &InstanceFull) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(s, "{k}: {v}");
    };
    line("Name", &i.name);
    if !i.description.is_empty() {
        line("Description", &i.description);
    }
    line(
        "Type",
        if i.r#type.is_empty() {
            "container"
        } else {
            &i.r#type
        },
    );
    line("Status", &i.status.to_uppercase());
    line("Location", &i.location);
    let image = i
        .config
        .get("image.alias")
        .or_else(|| i.expanded_config.get("image.alias"));
    line("Image", image.map(String::as_str).unwrap_or(""));
    if !i.architecture.is_empty() {
        line("Architecture", &i.architecture);
    }
    line("Created", &format_time(&i.created_at));
    line("Last Used", &format_time(&i.last_used_at));
    line("Stateful", if i.stateful { "true" } else { "false" });
    if let Some(st) = i.state.as_ref().filter(|st| st.pid != 0) {
        line("PID", &st.pid.to_string());
        line("Processes", &st.processes.to_string());
        if !st.started_at.is_empty() {
            line("Started", &format_time(&st.started_at));
        }
        line("Memory usage", &format_bytes(st.memory.usage));
        if st.memory.usage_peak > 0 {
            line("Memory usage (peak)", &format_bytes(st.memory.usage_peak));
        }
    }
    if !i.snapshots.is_empty() {
        line("Snapshots", &i.snapshots.len().to_string());
    }
    s.push_str("Config:\n");
    for (k, v) in &i.config {
        let _ = writeln!(s, "  {k}: {v}");
    }
    s
}

pub async fn info(ctx: &Ctx, name: &str) -> Result<i32> {
    let env = ctx
        .client
        .get(&format!("/1.0/instances/{name}?recursion=1"))
        .await?;
    if ctx.json() {
        ctx.print_json(&env.metadata);
        return Ok(OK);
    }
    let inst: InstanceFull = env.decode()?;
    print_out(&info_text(&inst));
    Ok(OK)
}

/// The body of `PUT /1.0/instances/<name>/state`.
pub fn state_body(action: &str, timeout: i64, force: bool, stateful: bool) -> Value {
    json!({"action": action, "timeout": timeout, "force": force, "stateful": stateful})
}

async fn change_state(ctx: &Ctx, name: &str, body: Value, what: String) -> Result<Operation> {
    ctx.run_op(
        Method::PUT,
        &format!("/1.0/instances/{name}/state"),
        Some(&body),
        &what,
    )
    .await
}

pub async fn start(ctx: &Ctx, name: &str) -> Result<i32> {
    // Like incus: resume a saved state if there is one.
    let inst = ctx.client.instance(name).await?;
    let body = state_body("start", 0, false, inst.stateful);
    match change_state(ctx, name, body, format!("Starting {name}")).await {
        Err(e) if matches!(e.downcast_ref(), Some(ClientError::OperationFailed(_))) => {
            bail!("{e}\nTry `ferry console --show-log {name}` for more info")
        }
        r => r.map(|_| OK),
    }
}

pub async fn stop(ctx: &Ctx, args: &StopArgs) -> Result<i32> {
    let body = state_body(
        "stop",
        args.timeout.unwrap_or(-1),
        args.force,
        args.stateful,
    );
    change_state(ctx, &args.name, body, format!("Stopping {}", args.name)).await?;
    Ok(OK)
}

pub async fn restart(ctx: &Ctx, args: &RestartArgs) -> Result<i32> {
    let body = state_body("restart", args.timeout.unwrap_or(-1), args.force, false);
    change_state(ctx, &args.name, body, format!("Restarting {}", args.name)).await?;
    Ok(OK)
}

pub async fn delete(ctx: &Ctx, args: &DeleteArgs) -> Result<i32> {
    let name = &args.name;
    if args.force {
        let inst = ctx.client.instance(name).await?;
        // Anything not cleanly stopped (running, or in Error with a QEMU
        // still there) is stopped by force first.
        if inst.status_code != ferry_client::types::status_code::STOPPED {
            let body = state_body("stop", -1, true, false);
            change_state(ctx, name, body, format!("Stopping {name}")).await?;
        }
    }
    let path = format!("/1.0/instances/{name}");
    ctx.run_op(Method::DELETE, &path, None, &format!("Deleting {name}"))
        .await?;
    Ok(OK)
}

/// The body of `POST /1.0/instances/<name>/exec`.
pub fn exec_body(args: &ExecArgs) -> Value {
    let env: BTreeMap<&str, &str> = args
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json!({
        "command": args.command,
        "environment": env,
        "record-output": true,
        "wait-for-websocket": false,
        "interactive": false,
    })
}

/// API path of a recorded output log named in `metadata.output`.
pub fn log_path(instance: &str, url: &str) -> String {
    if url.starts_with('/') {
        url.to_string()
    } else {
        format!("/1.0/instances/{instance}/logs/{url}")
    }
}

pub async fn exec(ctx: &Ctx, args: &ExecArgs) -> Result<i32> {
    let path = format!("/1.0/instances/{}/exec", args.name);
    let spinner = Spinner::hidden();
    let op = ctx
        .client
        .run_async(Method::POST, &path, Some(&exec_body(args)), |op| {
            spinner.update(op)
        })
        .await?;
    drop(spinner);
    let output = op.metadata.get("output").and_then(Value::as_object);
    for (fd, url) in output.into_iter().flatten() {
        let Some(url) = url.as_str() else { continue };
        let data = ctx.client.get_raw(&log_path(&args.name, url)).await?;
        match fd.as_str() {
            "1" => write_all(&mut std::io::stdout().lock(), &data),
            "2" => write_all(&mut std::io::stderr().lock(), &data),
            _ => {}
        }
    }
    let Some(code) = op.metadata.get("return").and_then(Value::as_i64) else {
        bail!("The exec operation did not report an exit status");
    };
    Ok(code as i32)
}

fn write_all(w: &mut dyn std::io::Write, data: &[u8]) {
    let _ = w.write_all(data);
    let _ = w.flush();
}

pub async fn console(ctx: &Ctx, args: &ConsoleArgs) -> Result<i32> {
    if !args.show_log {
        bail!(
            "The interactive console is not supported yet: use `ferry console --show-log {}`",
            args.name
        );
    }
    let data = ctx
        .client
        .get_raw(&format!("/1.0/instances/{}/console?type=log", args.name))
        .await?;
    write_all(&mut std::io::stdout().lock(), &data);
    Ok(OK)
}

#[cfg(test)]
#[path = "cmd_instance_tests.rs"]
mod tests;
