use super::*;
use crate::protocol::{Compression as C, FsTransfer as F, QemuFeature as Q, StateTransfer as S};

fn archive(c: &[C]) -> F {
    F::Archive {
        compression: c.to_vec(),
    }
}

fn container_offer() -> Offer {
    Offer {
        instance_type: InstanceType::Container,
        fs: vec![
            F::Shared {
                pool_id: "nfs1".into(),
            },
            archive(&[C::Zstd, C::None]),
        ],
        state: vec![
            S::CriuPreDump {
                max_iterations: 10,
                goal_percent: 70,
            },
            S::CriuPageServer,
            S::CriuLazyPages,
            S::StatefulStopFile,
        ],
        state_compression: vec![C::Zstd, C::None],
        volume_size: 100,
        snapshots: vec!["snap0".into()],
        stateful: true,
        live: true,
        options: MoveOptions::default(),
    }
}

fn vm_offer() -> Offer {
    Offer {
        instance_type: InstanceType::Vm,
        fs: vec![archive(&[C::Zstd, C::None])],
        state: vec![
            S::VmQemuLive {
                features: vec![Q::AutoConverge, Q::Xbzrle, Q::Postcopy],
            },
            S::StatefulStopFile,
        ],
        state_compression: vec![C::None],
        volume_size: 100,
        snapshots: vec![],
        stateful: true,
        live: true,
        options: MoveOptions {
            bandwidth: Some(1 << 26),
            max_downtime_ms: Some(300),
            downtime_target_ms: None,
            postcopy: false,
            state_compression: None,
        },
    }
}

/// The plan gives a reason containing `text`.
fn assert_reason(plan: &Plan, text: &str) {
    assert!(
        plan.reasons.iter().any(|r| r.contains(text)),
        "no reason containing {text:?} in {:?}",
        plan.reasons
    );
}

fn caps(fs: Vec<F>, state: Vec<S>) -> Capabilities {
    Capabilities {
        fs,
        state,
        state_compression: vec![C::Zstd, C::None],
        free_bytes: None,
    }
}

fn full_container_caps() -> Capabilities {
    caps(
        vec![archive(&[C::None, C::Zstd])],
        vec![
            S::CriuPreDump {
                max_iterations: 5,
                goal_percent: 80,
            },
            S::CriuPageServer,
            S::CriuLazyPages,
            S::StatefulStopFile,
        ],
    )
}

#[test]
fn container_live_with_pre_dump_and_source_preferences() {
    let plan = negotiate(&container_offer(), &full_container_caps()).unwrap();
    // shared pool not seen by the target -> archive, with the source's preferred compression
    assert_eq!(
        plan.fs,
        FsPlan::Archive {
            compression: C::Zstd
        }
    );
    assert_eq!(
        plan.state,
        StatePlan::CriuPageServer {
            pre_dump: Some(PreDump {
                max_iterations: 5,
                goal_percent: 70
            }),
            lazy_pages: false,
            page_sink: None,
        }
    );
    assert_eq!(plan.state_compression, C::Zstd);
    assert!(plan.is_live() && !plan.is_postcopy());
    assert_reason(&plan, "does not see shared pool \"nfs1\"");
    assert_eq!(plan.snapshots, vec!["snap0".to_string()]);
}

#[test]
fn shared_pool_and_lazy_pages_when_postcopy_requested() {
    let mut offer = container_offer();
    offer.options.postcopy = true;
    let mut c = full_container_caps();
    c.fs.push(F::Shared {
        pool_id: "nfs1".into(),
    });
    c.free_bytes = Some(1); // irrelevant: nothing is copied
    let plan = negotiate(&offer, &c).unwrap();
    assert_eq!(
        plan.fs,
        FsPlan::Shared {
            pool_id: "nfs1".into()
        }
    );
    assert!(plan.is_postcopy() && plan.options.postcopy);
    assert_eq!(plan.fs_compression(), C::None);
}

#[test]
fn postcopy_not_shared_is_dropped_with_a_reason() {
    let mut offer = container_offer();
    offer.options.postcopy = true;
    let plan = negotiate(
        &offer,
        &caps(vec![archive(&[C::None])], vec![S::CriuPageServer]),
    )
    .unwrap();
    assert_eq!(
        plan.state,
        StatePlan::CriuPageServer {
            pre_dump: None,
            lazy_pages: false,
            page_sink: None,
        }
    );
    assert!(!plan.options.postcopy);
    assert_reason(&plan, "criu_lazy_pages is not shared");
    assert_eq!(
        plan.fs,
        FsPlan::Archive {
            compression: C::None
        }
    );
}

#[test]
fn vm_features_are_intersected_and_postcopy_needs_the_flag() {
    let c = caps(
        vec![archive(&[C::Zstd])],
        vec![S::VmQemuLive {
            features: vec![Q::Postcopy, Q::AutoConverge],
        }],
    );
    let plan = negotiate(&vm_offer(), &c).unwrap();
    assert_eq!(
        plan.state,
        StatePlan::VmQemuLive {
            features: vec![Q::AutoConverge]
        }
    );
    assert_reason(&plan, "not shared with the target: xbzrle");
    assert_eq!(
        plan.state_compression,
        C::None,
        "the source offered no state compression"
    );
    let mut offer = vm_offer();
    offer.options.postcopy = true;
    let plan = negotiate(&offer, &c).unwrap();
    assert_eq!(
        plan.state,
        StatePlan::VmQemuLive {
            features: vec![Q::AutoConverge, Q::Postcopy]
        }
    );
    assert!(plan.is_postcopy());
}

#[test]
fn older_target_without_live_falls_back_to_stateful_stop() {
    let c = caps(
        vec![archive(&[C::Zstd, C::None])],
        vec![S::StatefulStopFile],
    );
    let plan = negotiate(&vm_offer(), &c).unwrap();
    assert_eq!(plan.state, StatePlan::StatefulStopFile);
    assert!(!plan.is_live());
    assert_eq!(plan.state_compression, C::None);
    assert!(plan
        .reasons
        .iter()
        .any(|r| r.contains("does not accept vm_qemu_live") && r.contains("falling back")));
    let plan = negotiate(&container_offer(), &c).unwrap();
    assert_eq!(plan.state, StatePlan::StatefulStopFile);
}

#[test]
fn not_live_asks_for_stateful_stop_and_stateless_needs_no_state() {
    let mut offer = container_offer();
    offer.live = false;
    assert_eq!(
        negotiate(&offer, &full_container_caps()).unwrap().state,
        StatePlan::StatefulStopFile
    );
    offer.stateful = false;
    let plan = negotiate(&offer, &caps(vec![archive(&[C::None])], vec![])).unwrap();
    assert_eq!(plan.state, StatePlan::None);
    assert!(!plan.is_stateful());
    assert_eq!(plan.to_response().state, vec![S::None]);
}

#[test]
fn errors() {
    let e = negotiate(&vm_offer(), &caps(vec![archive(&[C::Zstd])], vec![])).unwrap_err();
    assert!(matches!(e, NegotiationError::NoStateTransfer(_)), "{e}");
    assert!(e.to_string().contains("--stateless"));
    let e = negotiate(
        &vm_offer(),
        &caps(
            vec![F::Shared {
                pool_id: "x".into(),
            }],
            vec![S::StatefulStopFile],
        ),
    )
    .unwrap_err();
    assert!(matches!(e, NegotiationError::NoFsTransfer(_)), "{e}");
    let e = negotiate(
        &vm_offer(),
        &caps(vec![archive(&[C::Unknown])], vec![S::StatefulStopFile]),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("no archive compression in common"),
        "{e}"
    );
    let mut c = caps(
        vec![archive(&[C::None, C::Zstd])],
        vec![S::StatefulStopFile],
    );
    c.free_bytes = Some(99);
    assert_eq!(
        negotiate(&vm_offer(), &c).unwrap_err(),
        NegotiationError::InsufficientSpace {
            needed: 100,
            free: 99
        }
    );
    let mut bad = vm_offer();
    bad.state.push(S::CriuPageServer);
    let e = negotiate(&bad, &c).unwrap_err();
    assert_eq!(e.to_string(), "invalid migration offer: criu_page_server is a container state transfer, the instance is a VM");
    let mut bad = container_offer();
    bad.fs = vec![F::Unknown];
    assert!(matches!(
        negotiate(&bad, &c).unwrap_err(),
        NegotiationError::InvalidOffer(_)
    ));
}

#[test]
fn source_recheck_accepts_the_targets_response_and_refuses_forgeries() {
    let offer = container_offer();
    let plan = negotiate(&offer, &full_container_caps()).unwrap();
    let resp = plan.to_response();
    assert_eq!(check_response(&offer, &resp).unwrap(), plan);

    // Something never offered.
    let mut forged = resp.clone();
    forged.fs = vec![F::Shared {
        pool_id: "other".into(),
    }];
    assert!(matches!(
        check_response(&offer, &forged),
        Err(ProtocolError::BadResponse(_))
    ));
    // Lazy pages without the user asking for post-copy.
    let mut forged = resp.clone();
    forged.state.push(S::CriuLazyPages);
    assert!(check_response(&offer, &forged)
        .unwrap_err()
        .to_string()
        .contains("not a valid choice"));
    // A pre-dump more aggressive than offered.
    let mut forged = resp.clone();
    forged.state[0] = S::CriuPreDump {
        max_iterations: 50,
        goal_percent: 70,
    };
    assert!(check_response(&offer, &forged).is_err());
    // Compression that does not match the chosen fs.
    let mut forged = resp;
    forged.compression = C::None;
    assert!(check_response(&offer, &forged).is_err());
}

#[test]
fn for_version_drops_what_the_version_cannot_express() {
    let mut offer = vm_offer();
    offer.state.insert(0, S::Unknown);
    offer.state[1] = S::VmQemuLive {
        features: vec![Q::Unknown, Q::AutoConverge],
    };
    offer.fs = vec![F::Unknown, archive(&[C::Unknown, C::Zstd])];
    let o = offer.clone().for_version(2);
    assert_eq!(o.fs, vec![archive(&[C::Zstd])]);
    assert_eq!(
        o.state,
        vec![
            S::VmQemuLive {
                features: vec![Q::AutoConverge]
            },
            S::StatefulStopFile
        ]
    );
    assert!(offer.version_notes(2).is_empty());
    // Version 1 has no live transfer: only the stateful stop remains.
    let notes = offer.version_notes(1);
    let o = offer.for_version(1);
    assert_eq!(o.fs, vec![archive(&[C::Zstd])]);
    assert_eq!(o.state, vec![S::StatefulStopFile]);
    assert!(
        notes.len() == 1 && notes[0].contains("protocol v1") && notes[0].contains("vm_qemu_live"),
        "{notes:?}"
    );
}

#[test]
fn a_v1_peer_gets_a_stateful_stop_instead_of_a_live_move() {
    let plan = negotiate(
        &container_offer().for_version(1),
        &full_container_caps().for_version(1),
    )
    .unwrap();
    assert_eq!(plan.state, StatePlan::StatefulStopFile);
    assert!(plan.is_stateful() && !plan.is_live());
}

#[test]
fn plan_display_is_readable() {
    let plan = negotiate(&container_offer(), &full_container_caps()).unwrap();
    let s = plan.to_string();
    assert!(
        s.contains("fs: archive (zstd)")
            && s.contains("pre-dump ≤5× until 70%")
            && s.contains("live: true"),
        "{s}"
    );
}

#[test]
fn zstd_frames_is_chosen_by_new_peers_and_skipped_by_older_ones() {
    let mut offer = container_offer();
    offer.state_compression = vec![C::ZstdFrames, C::None, C::Zstd];
    let mut c = full_container_caps();
    c.state_compression = vec![C::ZstdFrames, C::Zstd, C::None];
    assert_eq!(
        negotiate(&offer, &c).unwrap().state_compression,
        C::ZstdFrames
    );
    // A target from before zstd_frames reads it as an unknown value and
    // answers with what it knows: the source's next choice wins.
    let wire = serde_json::to_string(&offer).unwrap();
    let mut seen_by_old: Offer = serde_json::from_str(&wire).unwrap();
    seen_by_old.state_compression = seen_by_old
        .state_compression
        .iter()
        .map(|x| if *x == C::ZstdFrames { C::Unknown } else { *x })
        .collect();
    let mut old = full_container_caps();
    old.state_compression = vec![C::Zstd, C::None];
    assert_eq!(
        negotiate(&seen_by_old, &old).unwrap().state_compression,
        C::None
    );
    // Protocol v1 cannot express it (nor stream state at all).
    assert_eq!(
        offer.clone().for_version(1).state_compression,
        vec![C::None, C::Zstd]
    );
    // zstd_frames is never a byte-stream codec (the fs channel).
    let io = tokio::io::duplex(64);
    assert!(crate::ByteChannel::new(io.0, C::ZstdFrames).is_err());
}

#[test]
fn page_sink_only_for_a_plain_dump_of_a_layout_both_know() {
    let sink = |criu_iov| S::FerryPageSink { criu_iov };
    let plain = |mut o: Offer| {
        o.state.retain(|s| !matches!(s, S::CriuPreDump { .. }));
        o.state.push(sink(2));
        o
    };
    let with_sink = |iov| {
        let mut c = full_container_caps();
        c.state.push(sink(iov));
        c
    };
    // Both list layout 2, stop-and-copy: the sink; the response says so and
    // the source derives the same plan from it.
    let offer = plain(container_offer());
    let plan = negotiate(&offer, &with_sink(2)).unwrap();
    assert_eq!(
        plan.state,
        StatePlan::CriuPageServer {
            pre_dump: None,
            lazy_pages: false,
            page_sink: Some(2),
        }
    );
    assert!(plan.to_string().contains("ferry's page sink"), "{plan}");
    let resp = plan.to_response();
    assert!(resp.state.contains(&sink(2)));
    assert_eq!(check_response(&offer, &resp).unwrap().state, plan.state);
    // Another layout, or a target without the sink: CRIU's page server.
    for caps in [with_sink(3), full_container_caps()] {
        let plan = negotiate(&offer, &caps).unwrap();
        assert!(
            matches!(
                plan.state,
                StatePlan::CriuPageServer {
                    page_sink: None,
                    ..
                }
            ),
            "{plan}"
        );
    }
    // Pre-dumps (parents) and post-copy (lazy pages) keep CRIU's server.
    let mut pre = container_offer();
    pre.state.push(sink(2));
    let plan = negotiate(&pre, &with_sink(2)).unwrap();
    assert!(
        matches!(
            plan.state,
            StatePlan::CriuPageServer {
                page_sink: None,
                pre_dump: Some(_),
                ..
            }
        ),
        "{plan}"
    );
    let mut lazy = plain(container_offer());
    lazy.options.postcopy = true;
    let plan = negotiate(&lazy, &with_sink(2)).unwrap();
    assert!(
        matches!(
            plan.state,
            StatePlan::CriuPageServer {
                page_sink: None,
                lazy_pages: true,
                ..
            }
        ),
        "{plan}"
    );
    // Not a VM transfer.
    let mut vm = vm_offer();
    vm.state.push(sink(2));
    assert!(negotiate(&vm, &with_sink(2)).is_err());
    // Since v2: an older offer never carries it.
    let old = offer.for_version(1);
    assert!(!old
        .state
        .iter()
        .any(|s| matches!(s, S::FerryPageSink { .. })));
}

#[test]
fn acknowledged_frames_when_both_sides_have_them_else_plain_frames() {
    let mut offer = vm_offer();
    offer.state_compression = vec![C::ZstdFramesAcked, C::ZstdFrames, C::None];
    let mut c = caps(
        vec![archive(&[C::Zstd])],
        vec![S::VmQemuLive {
            features: vec![Q::AutoConverge],
        }],
    );
    c.state_compression = vec![C::ZstdFramesAcked, C::ZstdFrames, C::None];
    assert_eq!(
        negotiate(&offer, &c).unwrap().state_compression,
        C::ZstdFramesAcked
    );
    // A target built before acknowledgements reads the value as unknown.
    let older: Vec<C> = serde_json::from_str(r#"["zstd_frames_acked", "zstd_frames"]"#).unwrap();
    assert_eq!(older, vec![C::ZstdFramesAcked, C::ZstdFrames]);
    let unknown: C = serde_json::from_str(r#""zstd_frames_windowed""#).unwrap();
    assert_eq!(unknown, C::Unknown);
    c.state_compression = vec![C::ZstdFrames, C::None];
    assert_eq!(
        negotiate(&offer, &c).unwrap().state_compression,
        C::ZstdFrames
    );
    // Protocol v1 has neither.
    let v1 = offer.for_version(1);
    assert_eq!(v1.state_compression, vec![C::None]);
}

#[test]
fn multifd_only_when_both_offer_it_and_never_with_postcopy_or_xbzrle() {
    let offer_with = |features: Vec<Q>| {
        let mut o = vm_offer();
        o.state = vec![S::VmQemuLive { features }];
        o
    };
    let target =
        |features: Vec<Q>| caps(vec![archive(&[C::Zstd])], vec![S::VmQemuLive { features }]);
    let live = |features: Vec<Q>| StatePlan::VmQemuLive { features };
    // Both sides: multifd.
    let plan = negotiate(
        &offer_with(vec![Q::AutoConverge, Q::Multifd]),
        &target(vec![Q::AutoConverge, Q::Multifd]),
    )
    .unwrap();
    assert_eq!(plan.state, live(vec![Q::AutoConverge, Q::Multifd]));
    assert!(plan.to_string().contains("multifd"), "{plan}");
    // A target that does not know it (an older ferry, or QEMU before 8.0).
    let plan = negotiate(
        &offer_with(vec![Q::AutoConverge, Q::Multifd]),
        &target(vec![Q::AutoConverge, Q::Postcopy, Q::Xbzrle]),
    )
    .unwrap();
    assert_eq!(plan.state, live(vec![Q::AutoConverge]));
    assert_reason(&plan, "not shared with the target: multifd");
    // Never together with post-copy or XBZRLE, whatever was offered.
    let everything = vec![Q::AutoConverge, Q::Postcopy, Q::Xbzrle, Q::Multifd];
    let mut offer = offer_with(everything.clone());
    offer.options.postcopy = true;
    let plan = negotiate(&offer, &target(everything.clone())).unwrap();
    assert_eq!(
        plan.state,
        live(vec![Q::AutoConverge, Q::Postcopy, Q::Xbzrle])
    );
    assert_reason(&plan, "multifd is not used with post-copy");
}

#[test]
fn an_offer_leads_with_a_live_vm_move_only_where_the_disk_needs_no_copy_first() {
    let mirror = F::BlockMirror {
        compression: vec![C::None],
    };
    let shared = F::Shared {
        pool_id: "nfs1".into(),
    };
    let with_fs = |fs: Vec<F>| Offer { fs, ..vm_offer() };
    assert!(has_live_vm(2) && !has_live_vm(1));
    assert!(with_fs(vec![mirror.clone(), archive(&[C::None])]).leads_with_live_vm(2));
    assert!(with_fs(vec![shared.clone()]).leads_with_live_vm(2));
    // The disk travels first as an archive: QEMU must wait for it.
    assert!(!with_fs(vec![archive(&[C::None]), mirror.clone()]).leads_with_live_vm(2));
    // Protocol v1 has no live VM move.
    assert!(!with_fs(vec![mirror.clone()]).leads_with_live_vm(1));
    // A stateful stop, or a container.
    let stop = Offer {
        state: vec![S::StatefulStopFile],
        ..with_fs(vec![mirror.clone()])
    };
    assert!(!stop.leads_with_live_vm(2));
    assert!(!Offer {
        fs: vec![shared],
        ..container_offer()
    }
    .leads_with_live_vm(2));
}
