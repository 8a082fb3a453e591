use super::*;
use crate::negotiate::{negotiate, Capabilities};

fn offer(stateful: bool) -> Offer {
    Offer {
        instance_type: InstanceType::Container,
        fs: vec![FsTransfer::Archive {
            compression: vec![Compression::Zstd, Compression::None],
        }],
        state: vec![
            StateTransfer::CriuPageServer,
            StateTransfer::StatefulStopFile,
        ],
        state_compression: vec![Compression::None],
        volume_size: 1 << 20,
        snapshots: vec![],
        stateful,
        live: true,
        options: MoveOptions::default(),
    }
}

fn caps() -> Capabilities {
    Capabilities {
        fs: vec![FsTransfer::Archive {
            compression: vec![Compression::Zstd, Compression::None],
        }],
        state: vec![
            StateTransfer::CriuPageServer,
            StateTransfer::StatefulStopFile,
        ],
        state_compression: vec![Compression::None],
        free_bytes: None,
    }
}

fn hello(role: Role) -> Message {
    Message::Hello(Hello::new(VersionRange::CURRENT, "ferry test", role))
}

fn all_messages() -> Vec<(&'static str, Message)> {
    vec![
        ("hello(source)", hello(Role::Source)),
        ("hello(target)", hello(Role::Target)),
        ("offer", Message::Offer(offer(true))),
        (
            "response",
            Message::Response(negotiate(&offer(true), &caps()).unwrap().to_response()),
        ),
        ("fs_done", Message::FsDone { bytes: 10 }),
        ("state_ready", Message::StateReady {}),
        ("listening", Message::Listening {}),
        (
            "progress",
            Message::Progress(Progress {
                stage: Stage::Memory,
                bytes: 1,
                total: Some(2),
                detail: None,
            }),
        ),
        ("resumed", Message::Resumed { at_us: None }),
        ("success", Message::Success {}),
        (
            "failure",
            Message::Failure {
                message: "boom".into(),
            },
        ),
        (
            "cancel",
            Message::Cancel {
                reason: "user".into(),
            },
        ),
    ]
}

fn target_states(stateful: bool) -> Vec<(TargetState, Vec<&'static str>)> {
    let plan = negotiate(&offer(stateful), &caps()).unwrap();
    let v = 1;
    let tr = |fs_done, state_ready| TargetState::Transfer {
        version: v,
        plan: plan.clone(),
        fs_done,
        state_ready,
    };
    let mut out = vec![
        (
            TargetState::new(VersionRange::CURRENT, caps()),
            vec!["hello(source)"],
        ),
        (
            TargetState::AwaitOffer {
                version: v,
                caps: caps(),
            },
            vec!["offer", "failure", "cancel"],
        ),
        (
            TargetState::Restore {
                version: v,
                plan: plan.clone(),
            },
            vec!["progress", "failure", "cancel"],
        ),
        (
            TargetState::Resumed {
                version: v,
                plan: plan.clone(),
            },
            vec!["progress", "failure"],
        ),
        (
            TargetState::Done {
                version: v,
                plan: plan.clone(),
            },
            vec![],
        ),
        (
            TargetState::Failed {
                message: "x".into(),
            },
            vec![],
        ),
        (TargetState::Cancelled { reason: "x".into() }, vec![]),
    ];
    if stateful {
        out.push((
            tr(false, false),
            vec!["progress", "fs_done", "state_ready", "failure", "cancel"],
        ));
        out.push((
            tr(true, false),
            vec!["progress", "state_ready", "failure", "cancel"],
        ));
        out.push((
            tr(false, true),
            vec!["progress", "fs_done", "failure", "cancel"],
        ));
    } else {
        out.push((
            tr(false, false),
            vec!["progress", "fs_done", "failure", "cancel"],
        ));
    }
    out
}

#[test]
fn target_state_machine_rejects_every_illegal_transition() {
    for stateful in [true, false] {
        for (state, legal) in target_states(stateful) {
            for (name, msg) in all_messages() {
                let res = state.clone().on_message(msg);
                assert_eq!(
                    res.is_ok(),
                    legal.contains(&name),
                    "target in {:?} (stateful {stateful}) on {name}: {res:?}",
                    state.name()
                );
            }
        }
    }
}

fn source_states() -> Vec<(SourceState, Vec<&'static str>)> {
    let plan = negotiate(&offer(true), &caps()).unwrap();
    let v = 1;
    let tr = |fs_sent, state_sent| SourceState::Transfer {
        version: v,
        plan: plan.clone(),
        fs_sent,
        state_sent,
    };
    vec![
        (
            SourceState::new(VersionRange::CURRENT, offer(true)),
            vec!["hello(target)"],
        ),
        (
            SourceState::AwaitResponse {
                version: v,
                offer: offer(true),
            },
            vec!["response", "failure", "cancel"],
        ),
        (tr(false, false), vec!["progress", "failure", "cancel"]),
        (tr(true, false), vec!["progress", "failure", "cancel"]),
        (tr(false, true), vec!["progress", "failure", "cancel"]),
        (
            tr(true, true),
            vec!["progress", "resumed", "success", "failure", "cancel"],
        ),
        (
            SourceState::Resumed {
                version: v,
                plan: plan.clone(),
            },
            vec!["progress", "success", "failure"],
        ),
        (
            SourceState::Done {
                version: v,
                plan: plan.clone(),
            },
            vec![],
        ),
        (
            SourceState::Failed {
                message: "x".into(),
            },
            vec![],
        ),
        (SourceState::Cancelled { reason: "x".into() }, vec![]),
    ]
}

#[test]
fn source_state_machine_rejects_every_illegal_transition() {
    for (state, legal) in source_states() {
        for (name, msg) in all_messages() {
            let res = state.clone().on_message(msg);
            assert_eq!(
                res.is_ok(),
                legal.contains(&name),
                "source in {:?} on {name}: {res:?}",
                state.name()
            );
        }
    }
}

/// A live VM plan, with or without the target's `listening` message.
fn vm_plan(features: Vec<QemuFeature>) -> crate::negotiate::Plan {
    let mut o = offer(true);
    o.instance_type = InstanceType::Vm;
    o.state = vec![StateTransfer::VmQemuLive {
        features: features.clone(),
    }];
    let mut c = caps();
    c.state = o.state.clone();
    negotiate(&o, &c).unwrap()
}

#[test]
fn the_source_takes_listening_only_while_sending_a_plan_that_has_it() {
    let transfer = |plan| SourceState::Transfer {
        version: 2,
        plan,
        fs_sent: false,
        state_sent: false,
    };
    let with = vm_plan(vec![QemuFeature::AutoConverge, QemuFeature::TargetListens]);
    assert!(with.has_qemu_feature(QemuFeature::TargetListens));
    let st = transfer(with.clone())
        .on_message(Message::Listening {})
        .unwrap();
    assert_eq!(st, transfer(with.clone()), "listening changes no state");
    let resumed = SourceState::Resumed {
        version: 2,
        plan: with,
    };
    assert!(resumed.on_message(Message::Listening {}).is_err());
    // A peer that did not agree to it does not send it.
    let without = vm_plan(vec![QemuFeature::AutoConverge]);
    let err = transfer(without)
        .on_message(Message::Listening {})
        .unwrap_err();
    assert!(err.to_string().contains("listening"), "{err}");
}

#[test]
fn specific_errors_say_what_went_wrong() {
    let t = TargetState::new(VersionRange::CURRENT, caps());
    let e = t
        .clone()
        .on_message(Message::Offer(offer(true)))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("received `offer` while awaiting the source's hello"),
        "{e}"
    );
    assert_eq!(
        t.on_message(hello(Role::Target)).unwrap_err(),
        ProtocolError::WrongRole { got: Role::Target }
    );

    let plan = negotiate(&offer(true), &caps()).unwrap();
    let t = TargetState::Transfer {
        version: 1,
        plan: plan.clone(),
        fs_done: true,
        state_ready: false,
    };
    assert_eq!(
        t.on_message(Message::FsDone { bytes: 1 }).unwrap_err(),
        ProtocolError::Repeated { event: "fs_done" }
    );
    let r = TargetState::Resumed {
        version: 1,
        plan: plan.clone(),
    };
    assert_eq!(
        r.on_message(Message::Cancel {
            reason: String::new()
        })
        .unwrap_err(),
        ProtocolError::TooLateToCancel
    );
    let d = TargetState::Done { version: 1, plan };
    assert!(d
        .on_message(Message::Cancel {
            reason: String::new()
        })
        .unwrap_err()
        .to_string()
        .contains("done"));
}

#[test]
fn target_walks_to_done_and_local_events_are_checked() {
    let mut t = TargetState::new(VersionRange::CURRENT, caps());
    assert!(t.clone().resumed().is_err());
    for m in [
        hello(Role::Source),
        Message::Offer(offer(true)),
        Message::FsDone { bytes: 5 },
    ] {
        t = t.on_message(m).unwrap();
    }
    assert!(matches!(
        t,
        TargetState::Transfer {
            fs_done: true,
            state_ready: false,
            ..
        }
    ));
    assert!(
        t.clone().succeed().is_err(),
        "cannot succeed before the state arrived"
    );
    t = t.on_message(Message::StateReady {}).unwrap();
    assert!(matches!(t, TargetState::Restore { .. }));
    t = t.resumed().unwrap().succeed().unwrap();
    assert!(t.is_terminal());
    assert!(t.plan().unwrap().is_live());
}

#[test]
fn stateless_plan_restores_after_fs_done_and_refuses_state() {
    let mut t = TargetState::new(VersionRange::CURRENT, caps());
    for m in [hello(Role::Source), Message::Offer(offer(false))] {
        t = t.on_message(m).unwrap();
    }
    assert!(t.clone().on_message(Message::StateReady {}).is_err());
    assert!(matches!(
        t.on_message(Message::FsDone { bytes: 0 }).unwrap(),
        TargetState::Restore { .. }
    ));

    let plan = negotiate(&offer(false), &caps()).unwrap();
    let s = SourceState::Transfer {
        version: 1,
        plan,
        fs_sent: false,
        state_sent: false,
    };
    assert!(s.clone().state_sent().is_err());
    let s = s.fs_sent().unwrap();
    assert_eq!(
        s.clone().fs_sent().unwrap_err(),
        ProtocolError::Repeated { event: "fs_done" }
    );
    assert!(matches!(
        s.on_message(Message::Success {}).unwrap(),
        SourceState::Done { .. }
    ));
}

#[test]
fn agree_version_picks_the_highest_common() {
    assert_eq!(agree_version(1, 1, 1, 1), Ok(1));
    assert_eq!(
        agree_version(1, 2, 1, 1),
        Ok(1),
        "v2 member with a v1 peer speaks v1"
    );
    assert_eq!(agree_version(1, 1, 1, 2), Ok(1));
    assert_eq!(agree_version(1, 3, 2, 5), Ok(3));
    assert_eq!(
        agree_version(2, 3, 1, 1).unwrap_err(),
        VersionError::NoCommonVersion {
            local_min: 2,
            local_max: 3,
            peer_min: 1,
            peer_max: 1
        }
    );
    assert!(agree_version(1, 1, 2, 2)
        .unwrap_err()
        .to_string()
        .contains("this member speaks v1..=v1, the peer speaks v2..=v2"));
    assert!(
        agree_version(1, 1, 3, 2).is_err(),
        "an inverted peer range agrees on nothing"
    );
}

#[test]
fn version_ranges_are_validated() {
    assert_eq!(VersionRange::CURRENT, VersionRange { min: 1, max: 2 });
    assert_eq!(
        VersionRange::previous_only(),
        VersionRange {
            min: MIN_PROTOCOL_VERSION,
            max: MIN_PROTOCOL_VERSION
        }
    );
    assert!(VersionRange::new(1, 1).is_ok());
    assert!(VersionRange::new(1, 2).is_ok());
    assert!(
        VersionRange::new(1, 3).is_err(),
        "this build cannot speak v3"
    );
    assert!(VersionRange::new(0, 1).is_err());
}

#[test]
fn hello_with_newer_min_version_is_refused() {
    let peer = Message::Hello(Hello {
        protocol_version: 4,
        min_version: 3,
        software_version: "ferry 9".into(),
        role: Role::Source,
    });
    let e = TargetState::new(VersionRange::CURRENT, caps())
        .on_message(peer)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Version(VersionError::NoCommonVersion { peer_min: 3, .. })
        ),
        "{e}"
    );
}

#[test]
fn wire_shapes() {
    let j = |m: &Message| serde_json::to_value(m).unwrap();
    assert_eq!(
        j(&hello(Role::Source)),
        serde_json::json!({"type":"hello","protocol_version":2,"min_version":1,"software_version":"ferry test","role":"source"})
    );
    assert_eq!(
        j(&Message::StateReady {}),
        serde_json::json!({"type":"state_ready"})
    );
    assert_eq!(
        j(&Message::FsDone { bytes: 7 }),
        serde_json::json!({"type":"fs_done","bytes":7})
    );
    let o = j(&Message::Offer(offer(true)));
    assert_eq!(
        o["fs"][0],
        serde_json::json!({"type":"archive","compression":["zstd","none"]})
    );
    assert_eq!(
        o["state"][0],
        serde_json::json!({"type":"criu_page_server"})
    );
    // Unknown fields and values from newer peers are tolerated.
    let m: Message = serde_json::from_str(r#"{"type":"success","took_ms":3}"#).unwrap();
    assert_eq!(m, Message::Success {});
    let c: Vec<Compression> = serde_json::from_str(r#"["lz5","zstd"]"#).unwrap();
    assert_eq!(c, vec![Compression::Unknown, Compression::Zstd]);
    let s: StateTransfer =
        serde_json::from_str(r#"{"type":"vm_qemu_multifd","channels":4}"#).unwrap();
    assert_eq!(s, StateTransfer::Unknown);
    let f: Vec<QemuFeature> = serde_json::from_str(r#"["dirty_limit","xbzrle"]"#).unwrap();
    assert_eq!(f, vec![QemuFeature::Unknown, QemuFeature::Xbzrle]);
    // Unknown message types are not: the version says what may be sent.
    assert!(serde_json::from_str::<Message>(r#"{"type":"teleport"}"#).is_err());
}
