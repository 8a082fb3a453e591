//! `ferry cluster enable|add|join|list|remove` (evacuate and restore are in
//! `cmd_evacuate`), `ferry move` and `ferry config`.

use anyhow::Result;
use ferry_client::Method;
use serde_json::{json, Value};

use crate::cli::{ClusterCommand, ConfigCommand, MoveArgs, TrustCommand};
use crate::cmd_evacuate;
use crate::ctx::Ctx;
use crate::output::{print_out, render_table};

pub async fn run(ctx: &Ctx, cmd: &ClusterCommand) -> Result<i32> {
    match cmd {
        ClusterCommand::Enable { name } => {
            let body = json!({"server_name": name, "enabled": true});
            ctx.run_op(
                Method::PUT,
                "/1.0/cluster",
                Some(&body),
                "Enabling clustering",
            )
            .await?;
            eprintln!("Clustering enabled: member \"{name}\" is the first member");
            Ok(0)
        }
        ClusterCommand::Add { name } => {
            let body = json!({"server_name": name});
            let op = ctx
                .run_op(
                    Method::POST,
                    "/1.0/cluster/members",
                    Some(&body),
                    "Requesting a join token",
                )
                .await?;
            let token = op.metadata["token"].as_str().unwrap_or_default();
            if ctx.json() {
                ctx.print_json(&op.metadata);
            } else {
                eprintln!(
                    "Member {name} join token (one use, expires {}):",
                    op.metadata["expiresAt"].as_str().unwrap_or("?")
                );
                println!("{token}");
            }
            Ok(0)
        }
        ClusterCommand::Join { token } => {
            let body = json!({"enabled": true, "cluster_token": token.trim()});
            ctx.run_op(
                Method::PUT,
                "/1.0/cluster",
                Some(&body),
                "Joining the cluster",
            )
            .await?;
            eprintln!("Joined the cluster");
            Ok(0)
        }
        ClusterCommand::List => list(ctx).await,
        ClusterCommand::Remove { name } => {
            ctx.client
                .delete(&format!("/1.0/cluster/members/{name}"), None)
                .await?;
            eprintln!("Member {name} removed");
            Ok(0)
        }
        ClusterCommand::Evacuate(a) => cmd_evacuate::evacuate(ctx, a).await,
        ClusterCommand::Restore(a) => cmd_evacuate::restore(ctx, a).await,
    }
}

/// `ferry move NAME --target MEMBER [--stateless]`.
pub async fn move_instance(ctx: &Ctx, a: &MoveArgs) -> Result<i32> {
    let bandwidth = match &a.bandwidth {
        None => None,
        Some(b) => Some(parse_bytes(b).ok_or_else(|| {
            anyhow::anyhow!("--bandwidth {b:?}: use a size per second like 64MiB or 100MB")
        })?),
    };
    if a.postcopy {
        eprintln!("Warning: with --postcopy the instance runs on the target before all its memory arrived; if the link breaks during the move, the instance is lost.");
    }
    let body = json!({"migration": true, "live": !a.stateless, "bandwidth": bandwidth, "max_downtime_ms": a.max_downtime, "downtime_target_ms": a.downtime_target, "postcopy": a.postcopy, "state_compression": a.compression});
    let path = format!("/1.0/instances/{}?target={}", a.name, a.target);
    let what = format!("Moving {} to {}", a.name, a.target);
    let op = ctx.run_op(Method::POST, &path, Some(&body), &what).await?;
    if ctx.json() {
        ctx.print_json(&op.metadata);
    } else {
        let path = op.metadata["path"].as_str().unwrap_or("moved");
        let downtime = op.metadata["downtime_ms"]
            .as_u64()
            .map(|d| format!(", {d} ms frozen"))
            .unwrap_or_default();
        eprintln!(
            "Moved {} to {} ({path}; {} ms in all{downtime})",
            a.name,
            a.target,
            op.metadata["total_ms"].as_u64().unwrap_or(0)
        );
        if let Some(why) = op.metadata["why"].as_str() {
            eprintln!("Note: {why}");
        }
    }
    Ok(0)
}

/// `64MiB`, `100MB`, `1GiB`, `4096` → bytes.
fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches("/s");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul).filter(|v| *v > 0)
}

/// `ferry config set|unset|get|show INSTANCE …` (PATCH /1.0/instances/NAME;
/// an empty value unsets a key) and `ferry config trust add|list|remove`.
pub async fn config(ctx: &Ctx, cmd: &ConfigCommand) -> Result<i32> {
    let t = match cmd {
        ConfigCommand::Trust(t) => t,
        ConfigCommand::Set { instance, pairs } => {
            let config: serde_json::Map<String, Value> =
                pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            patch_config(ctx, instance, config).await?;
            return Ok(0);
        }
        ConfigCommand::Unset { instance, keys } => {
            let config = keys.iter().map(|k| (k.clone(), json!(""))).collect();
            patch_config(ctx, instance, config).await?;
            return Ok(0);
        }
        ConfigCommand::Get {
            instance,
            config_key,
        } => {
            let env = ctx
                .client
                .get(&format!("/1.0/instances/{instance}"))
                .await?;
            let value = &env.metadata["config"][config_key.as_str()];
            if ctx.json() {
                ctx.print_json(value);
            } else {
                println!("{}", value.as_str().unwrap_or_default());
            }
            return Ok(0);
        }
        ConfigCommand::Show { instance } => {
            let env = ctx
                .client
                .get(&format!("/1.0/instances/{instance}"))
                .await?;
            let config = &env.metadata["config"];
            if ctx.json() {
                ctx.print_json(config);
            } else {
                for (k, v) in config.as_object().into_iter().flatten() {
                    println!("{k}: {}", v.as_str().unwrap_or_default());
                }
            }
            return Ok(0);
        }
    };
    match t {
        TrustCommand::Add { file, name } => {
            let pem = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let body = json!({"type": "client", "certificate": pem, "name": name.clone().unwrap_or_default()});
            let env = ctx.client.post("/1.0/certificates", Some(&body)).await?;
            eprintln!(
                "Trusted certificate {}",
                env.metadata["fingerprint"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        TrustCommand::List => {
            let env = ctx.client.get("/1.0/certificates").await?;
            if ctx.json() {
                ctx.print_json(&env.metadata);
                return Ok(0);
            }
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let rows: Vec<Vec<String>> = env
                .metadata
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|c| {
                    vec![
                        s(&c["name"]),
                        s(&c["type"]),
                        s(&c["fingerprint"]).chars().take(12).collect(),
                    ]
                })
                .collect();
            print_out(&render_table(&["NAME", "TYPE", "FINGERPRINT"], &rows));
            Ok(0)
        }
        TrustCommand::Remove { fingerprint } => {
            ctx.client
                .delete(&format!("/1.0/certificates/{fingerprint}"), None)
                .await?;
            eprintln!("Certificate {fingerprint} is no longer trusted");
            Ok(0)
        }
    }
}

pub fn rows(members: &[Value]) -> Vec<Vec<String>> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    members
        .iter()
        .map(|m| {
            let roles: Vec<String> = m["roles"]
                .as_array()
                .map(|r| r.iter().map(s).collect())
                .unwrap_or_default();
            let role = if roles.iter().any(|r| r == "database-leader") {
                "leader"
            } else if m["database"].as_bool() == Some(true) {
                "voter"
            } else {
                "standby"
            };
            vec![
                s(&m["server_name"]),
                s(&m["url"]),
                role.to_string(),
                s(&m["status"]).to_uppercase(),
                s(&m["version"]),
            ]
        })
        .collect()
}

async fn list(ctx: &Ctx) -> Result<i32> {
    let env = ctx.client.get("/1.0/cluster/members?recursion=1").await?;
    if ctx.json() {
        ctx.print_json(&env.metadata);
        return Ok(0);
    }
    let members = env.metadata.as_array().cloned().unwrap_or_default();
    print_out(&render_table(
        &["NAME", "URL", "ROLE", "STATUS", "VERSION"],
        &rows(&members),
    ));
    Ok(0)
}

async fn patch_config(
    ctx: &Ctx,
    instance: &str,
    config: serde_json::Map<String, Value>,
) -> Result<()> {
    let body = json!({ "config": config });
    ctx.client
        .request(
            Method::PATCH,
            &format!("/1.0/instances/{instance}"),
            Some(&body),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("100MB/s"), Some(100_000_000));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("fast"), None);
    }

    #[test]
    fn member_rows() {
        let m = vec![
            json!({"server_name": "m1", "url": "https://127.0.0.1:1", "roles": ["database-leader"], "database": true, "status": "Online", "version": "0.1.0"}),
            json!({"server_name": "m2", "url": "https://127.0.0.1:2", "roles": ["database"], "database": true, "status": "Offline", "version": "0.1.0"}),
        ];
        let r = rows(&m);
        assert_eq!(
            r[0],
            ["m1", "https://127.0.0.1:1", "leader", "ONLINE", "0.1.0"]
        );
        assert_eq!(r[1][2], "voter");
        assert_eq!(r[1][3], "OFFLINE");
    }
}
