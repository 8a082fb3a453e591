//! Request bodies, confirmation and report formatting of `ferry cluster
//! evacuate|restore` (no server).

use super::*;

use clap::Parser;
use ferry_client::Operation;

use crate::cli::{Cli, ClusterCommand, Command};

fn parse(args: &[&str]) -> Result<ClusterCommand, clap::Error> {
    let cli = Cli::try_parse_from(["ferry", "cluster"].into_iter().chain(args.iter().copied()))?;
    let Command::Cluster(c) = cli.command else {
        panic!("not a cluster command")
    };
    Ok(c)
}

fn evacuate_args(args: &[&str]) -> EvacuateArgs {
    let Ok(ClusterCommand::Evacuate(a)) = parse(args) else {
        panic!("{args:?}")
    };
    a
}

fn restore_args(args: &[&str]) -> RestoreArgs {
    let Ok(ClusterCommand::Restore(a)) = parse(args) else {
        panic!("{args:?}")
    };
    a
}

/// A finished evacuation where v1 failed (no downtime: it never moved) and
/// c2 moved cold (no downtime either).
fn sample() -> Value {
    json!({"member": "m1", "action": "evacuate", "mode": "live-migrate", "parallel": 2,
        "total": 4, "done": 4, "failed": 1,
        "instances": [
            {"name": "c1", "type": "container", "from": "m1", "to": "m2",
             "action": "live-migrate", "status": "moved", "path": "live",
             "downtime_ms": 320, "total_ms": 2100, "error": ""},
            {"name": "v1", "type": "virtual-machine", "from": "m1", "to": "m3",
             "action": "live-migrate", "status": "failed", "path": "",
             "error": "QEMU migration failed:\nconnection reset"},
            {"name": "c2", "type": "container", "from": "m1", "to": "m2",
             "action": "migrate", "status": "moved", "path": "cold", "downtime_ms": null},
            {"name": "c3", "type": "", "from": "m1", "to": "m1",
             "action": "stop", "status": "stopped", "path": "", "downtime_ms": 0, "error": ""}
        ],
        "current": []})
}

#[test]
fn evacuate_request_bodies() {
    let cases: [(&[&str], &str); 6] = [
        (&["evacuate", "m1"], ""),
        (&["evacuate", "m1", "--action", "auto"], "auto"),
        (
            &["evacuate", "m1", "--action", "live-migrate"],
            "live-migrate",
        ),
        (&["evacuate", "m1", "--action=migrate"], "migrate"),
        (&["evacuate", "m1", "--action", "stop", "--force"], "stop"),
        (&["evacuate", "--force", "m1"], ""),
    ];
    for (args, mode) in cases {
        let a = evacuate_args(args);
        assert_eq!(a.member, "m1");
        assert_eq!(
            evacuate_body(&a),
            json!({"action": "evacuate", "mode": mode}),
            "{args:?}"
        );
    }
    assert!(evacuate_args(&["evacuate", "m1", "-f"]).force);
    assert!(!evacuate_args(&["evacuate", "m1"]).force);
}

#[test]
fn restore_request_bodies() {
    let a = restore_args(&["restore", "m1"]);
    assert!(!a.force);
    assert_eq!(restore_body(&a), json!({"action": "restore", "mode": ""}));
    let a = restore_args(&["restore", "m1", "--skip-instances", "--force"]);
    assert!(a.force);
    assert_eq!(
        restore_body(&a),
        json!({"action": "restore", "mode": "skip"})
    );
}

#[test]
fn unknown_action_is_rejected_with_the_valid_ones() {
    let err = parse(&["evacuate", "m1", "--action", "teleport"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
    let msg = err.to_string();
    assert!(
        msg.contains("[possible values: auto, live-migrate, migrate, stop]"),
        "{msg}"
    );
    // Restore has no --action (its only alternative is --skip-instances).
    assert!(parse(&["restore", "m1", "--action", "skip"]).is_err());
    assert!(parse(&["evacuate"]).is_err(), "the member is required");
}

#[test]
fn report_rows_from_a_sample() {
    let rows = report_rows(&sample());
    assert_eq!(
        rows,
        [
            [
                "c1",
                "CONTAINER",
                "m1",
                "m2",
                "live-migrate",
                "MOVED",
                "live",
                "320ms",
                ""
            ],
            [
                "v1",
                "VIRTUAL-MACHINE",
                "m1",
                "m3",
                "live-migrate",
                "FAILED",
                "",
                "",
                "QEMU migration failed: connection reset"
            ],
            [
                "c2",
                "CONTAINER",
                "m1",
                "m2",
                "migrate",
                "MOVED",
                "cold",
                "",
                ""
            ],
            [
                "c3",
                "CONTAINER",
                "m1",
                "m1",
                "stop",
                "STOPPED",
                "",
                "0ms",
                ""
            ],
        ]
    );
    assert_eq!(
        report_text(&sample(), false),
        "NAME  TYPE             FROM  TO  ACTION        STATUS   PATH  DOWNTIME  ERROR\n\
         c1    CONTAINER        m1    m2  live-migrate  MOVED    live  320ms\n\
         v1    VIRTUAL-MACHINE  m1    m3  live-migrate  FAILED                   QEMU migration failed: connection reset\n\
         c2    CONTAINER        m1    m2  migrate       MOVED    cold\n\
         c3    CONTAINER        m1    m1  stop          STOPPED        0ms\n"
    );
}

#[test]
fn report_text_json_and_empty() {
    let text = report_text(&sample(), true);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), sample());
    assert!(text.ends_with("}\n"));
    let empty = json!({"member": "m1", "instances": [], "current": []});
    assert_eq!(report_text(&empty, false), "");
    assert_eq!(report_text(&Value::Null, false), "");
    assert!(report_rows(&json!({"instances": null})).is_empty());
}

#[test]
fn failed_operation_keeps_its_report() {
    // What the command does with the final operation: report, then error.
    let op: Operation = serde_json::from_value(json!({"id": "op1", "status": "Failure",
        "status_code": 400, "err": "Failed to evacuate 1 instance: v1: QEMU migration failed",
        "metadata": {"evacuation_progress": "4/4 instances done", "evacuation": sample()}}))
    .unwrap();
    let text = report_text(&op.metadata["evacuation"], false);
    assert_eq!(text.lines().count(), 5);
    assert!(text.contains("FAILED"));
    let err = op.into_result().unwrap_err();
    assert_eq!(
        err.to_string(),
        "Failed to evacuate 1 instance: v1: QEMU migration failed"
    );
}

#[test]
fn summaries() {
    let four_moved = json!({"instances": [
        {"status": "moved"}, {"status": "moved"}, {"status": "moved"}, {"status": "moved"}]});
    assert_eq!(
        summary(Job::Evacuate, "m1", &four_moved),
        "Member m1 evacuated: 4 instances moved"
    );
    let mixed = json!({"instances": [
        {"status": "unchanged"}, {"status": "stopped"}, {"status": "moved"}, {"status": "stopped"}]});
    assert_eq!(
        summary(Job::Evacuate, "m1", &mixed),
        "Member m1 evacuated: 1 instance moved, 2 stopped, 1 unchanged"
    );
    let restored = json!({"instances": [{"status": "started"}, {"status": "moved"}]});
    assert_eq!(
        summary(Job::Restore, "m2", &restored),
        "Member m2 restored: 1 instance moved, 1 started"
    );
    assert_eq!(
        summary(Job::Restore, "m1", &json!({"instances": []})),
        "Member m1 restored"
    );
    assert_eq!(
        summary(Job::Evacuate, "m1", &Value::Null),
        "Member m1 evacuated"
    );
}

#[test]
fn confirmation() {
    let ask = |job, force, interactive, answer: &str| {
        let mut prompt = Vec::new();
        let r = confirm(
            job,
            "m1",
            force,
            interactive,
            &mut answer.as_bytes(),
            &mut prompt,
        );
        (
            r.map_err(|e| e.to_string()),
            String::from_utf8(prompt).unwrap(),
        )
    };
    // --force: no question, whatever stdin is.
    assert_eq!(ask(Job::Evacuate, true, false, ""), (Ok(()), String::new()));
    assert_eq!(
        ask(Job::Restore, true, true, "no\n"),
        (Ok(()), String::new())
    );
    // Not a terminal and no --force: refuse, ask nothing.
    let (r, prompt) = ask(Job::Evacuate, false, false, "yes\n");
    assert_eq!(
        r.unwrap_err(),
        "Not asking whether to evacuate cluster member \"m1\": stdin is not a terminal. \
         Add --force to evacuate it without confirmation"
    );
    assert_eq!(prompt, "");
    // A terminal: only yes goes ahead.
    let (r, prompt) = ask(Job::Evacuate, false, true, "yes\n");
    assert_eq!(r, Ok(()));
    assert_eq!(
        prompt,
        "Are you sure you want to evacuate cluster member \"m1\"? (yes/no) [default=no]: "
    );
    assert_eq!(ask(Job::Restore, false, true, " YES \n").0, Ok(()));
    let (r, prompt) = ask(Job::Restore, false, true, "\n");
    assert_eq!(
        r.unwrap_err(),
        "Aborted: cluster member \"m1\" was not restored"
    );
    assert!(prompt.contains("want to restore cluster member \"m1\"?"));
    assert!(ask(Job::Evacuate, false, true, "y\n").0.is_err());
    assert!(ask(Job::Evacuate, false, true, "").0.is_err(), "EOF is no");
}
