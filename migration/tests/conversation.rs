//! Whole conversations between a simulated source and target over in-memory
//! pipes: happy path, version mismatch, a v2 peer talking to this v1 build.

use ferry_migration::*;
use serde_json::{json, Value};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

fn local() -> LocalEnd {
    LocalEnd::new(VersionRange::CURRENT, "ferry test")
}

fn container_offer() -> Offer {
    Offer {
        instance_type: InstanceType::Container,
        fs: vec![FsTransfer::Archive {
            compression: vec![Compression::Zstd, Compression::None],
        }],
        state: vec![
            StateTransfer::CriuPageServer,
            StateTransfer::StatefulStopFile,
        ],
        state_compression: vec![Compression::Zstd, Compression::None],
        volume_size: 4 << 20,
        snapshots: vec![],
        stateful: true,
        live: true,
        options: MoveOptions::default(),
    }
}

fn target_caps() -> Capabilities {
    Capabilities {
        fs: vec![FsTransfer::Archive {
            compression: vec![Compression::Zstd, Compression::None],
        }],
        state: vec![
            StateTransfer::CriuPageServer,
            StateTransfer::CriuLazyPages,
            StateTransfer::StatefulStopFile,
        ],
        state_compression: vec![Compression::Zstd, Compression::None],
        free_bytes: Some(1 << 30),
    }
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 97) as u8).wrapping_mul(31).wrapping_add(seed) ^ (i % 7) as u8)
        .collect()
}

/// The three channels, as (source end, target end).
fn channels() -> (
    (DuplexStream, DuplexStream, DuplexStream),
    (DuplexStream, DuplexStream, DuplexStream),
) {
    let (c1, c2) = duplex(64 * 1024);
    let (f1, f2) = duplex(64 * 1024);
    let (s1, s2) = duplex(64 * 1024);
    ((c1, f1, s1), (c2, f2, s2))
}

async fn run_source(
    control: DuplexStream,
    fs: DuplexStream,
    state: DuplexStream,
) -> Result<(SourceState, Vec<Stage>), SessionError> {
    let mut ch = FramedChannel::new(control);
    let st = source_handshake(&mut ch, &local(), container_offer()).await?;
    let plan = st.plan().unwrap().clone();

    // fs: the archive pass(es), then FsDone with the payload byte count.
    let mut fs = ByteChannel::new(fs, plan.fs_compression()).unwrap();
    fs.write_all(&payload(3 << 20, 1)).await.unwrap();
    fs.shutdown().await.unwrap();
    let fs_bytes = fs.counters().sent.get();
    ch.send(&Message::FsDone { bytes: fs_bytes }).await?;
    let st = st.fs_sent()?;

    // state: the dump stream, then StateReady.
    let mut state = ByteChannel::new(state, plan.state_compression).unwrap();
    state.write_all(&payload(1 << 20, 2)).await.unwrap();
    state.shutdown().await.unwrap();
    ch.send(&Message::StateReady {}).await?;
    let mut session = Session::Source(st.state_sent()?);

    let mut stages = Vec::new();
    loop {
        let (next, msg) = session.recv(&mut ch).await?;
        session = next;
        if let Message::Progress(p) = msg {
            stages.push(p.stage);
        }
        if let Session::Source(s @ SourceState::Done { .. }) = &session {
            return Ok((s.clone(), stages));
        }
    }
}

async fn run_target(
    control: DuplexStream,
    fs: DuplexStream,
    state: DuplexStream,
) -> Result<TargetState, SessionError> {
    let mut ch = FramedChannel::new(control);
    let st = target_handshake(&mut ch, &local(), target_caps()).await?;
    let plan = st.plan().unwrap().clone();

    let mut fs = ByteChannel::new(fs, plan.fs_compression()).unwrap();
    let mut got = Vec::new();
    fs.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, payload(3 << 20, 1));
    let mut state_ch = ByteChannel::new(state, plan.state_compression).unwrap();
    let mut state_bytes = Vec::new();
    state_ch.read_to_end(&mut state_bytes).await.unwrap();
    assert_eq!(state_bytes, payload(1 << 20, 2));

    let mut session = Session::Target(st);
    while !matches!(session, Session::Target(TargetState::Restore { .. })) {
        let (next, msg) = session.recv(&mut ch).await?;
        if let Message::FsDone { bytes } = msg {
            assert_eq!(
                bytes,
                fs.counters().received.get(),
                "source and target agree on the fs byte count"
            );
        }
        session = next;
    }
    let Session::Target(st) = session else {
        unreachable!()
    };
    ch.send(&Message::Progress(Progress {
        stage: Stage::Restoring,
        bytes: 0,
        total: None,
        detail: None,
    }))
    .await?;
    let st = st.resumed()?;
    ch.send(&Message::Resumed { at_us: None }).await?;
    let st = st.succeed()?;
    ch.send(&Message::Success {}).await?;
    Ok(st)
}

#[tokio::test]
async fn happy_path_live_container_move() {
    let ((c1, f1, s1), (c2, f2, s2)) = channels();
    let source = tokio::spawn(run_source(c1, f1, s1));
    let target = tokio::spawn(run_target(c2, f2, s2));
    let (src, stages) = source.await.unwrap().expect("source succeeds");
    let tgt = target.await.unwrap().expect("target succeeds");

    assert!(matches!(src, SourceState::Done { version: 2, .. }));
    assert!(matches!(tgt, TargetState::Done { version: 2, .. }));
    assert_eq!(src.plan(), tgt.plan(), "both sides carry out the same plan");
    let plan = src.plan().unwrap();
    assert!(plan.is_live());
    assert_eq!(
        plan.fs,
        FsPlan::Archive {
            compression: Compression::Zstd
        }
    );
    assert_eq!(
        plan.state,
        StatePlan::CriuPageServer {
            pre_dump: None,
            lazy_pages: false,
            page_sink: None,
        }
    );
    assert_eq!(plan.state_compression, Compression::Zstd);
    assert_eq!(stages, vec![Stage::Restoring]);
}

#[tokio::test]
async fn version_mismatch_fails_clearly_on_both_sides() {
    let (a, b) = duplex(4096);
    let target = tokio::spawn(async move {
        target_handshake(&mut FramedChannel::new(b), &local(), target_caps()).await
    });
    let mut peer = FramedChannel::new(a);
    peer.send(&Message::Hello(Hello {
        protocol_version: 4,
        min_version: 3,
        software_version: "ferry 9.0".into(),
        role: Role::Source,
    }))
    .await
    .unwrap();
    assert!(matches!(peer.recv().await.unwrap(), Message::Hello(h) if h.protocol_version == 2));
    let err = target.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, SessionError::Protocol(ProtocolError::Version(_))),
        "{err:?}"
    );
    assert!(
        text.contains("no common migration protocol version")
            && text.contains("the peer speaks v3..=v4"),
        "{text}"
    );
    // The peer is told why, not left waiting.
    match peer.recv().await.unwrap() {
        Message::Failure { message } => assert_eq!(message, text),
        m => panic!("expected failure, got {m:?}"),
    }
}

#[tokio::test]
async fn target_refusal_reaches_the_source_as_peer_failure() {
    let ((c1, _f1, _s1), (c2, _f2, _s2)) = channels();
    let mut caps = target_caps();
    caps.free_bytes = Some(10);
    let target =
        tokio::spawn(
            async move { target_handshake(&mut FramedChannel::new(c2), &local(), caps).await },
        );
    let err = source_handshake(&mut FramedChannel::new(c1), &local(), container_offer())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SessionError::PeerFailed(m) if m.contains("bytes free but the volume needs")),
        "{err}"
    );
    let terr = target.await.unwrap().unwrap_err();
    assert!(matches!(
        terr,
        SessionError::Protocol(ProtocolError::Negotiation(
            NegotiationError::InsufficientSpace { .. }
        ))
    ));
}

/// What a v3 build would know: each value with the version that added it.
const V3_QEMU_FEATURES: &[(&str, u32)] = &[
    ("auto_converge", 2),
    ("xbzrle", 2),
    ("dirty_limit", 3),
    ("postcopy", 2),
];

fn v3_offer(version: u32, sloppy: bool) -> Value {
    let features: Vec<&str> = V3_QEMU_FEATURES
        .iter()
        .filter(|(_, since)| sloppy || *since <= version)
        .map(|(f, _)| *f)
        .collect();
    let mut state = vec![
        json!({"type": "vm_qemu_live", "features": features}),
        json!({"type": "stateful_stop_file"}),
    ];
    if sloppy || version >= 3 {
        state.insert(0, json!({"type": "vm_qemu_multifd", "channels": 4}));
    }
    json!({
        "type": "offer", "instance_type": "vm",
        "fs": [{"type": "archive", "compression": ["zstd", "none"]}],
        "state": state,
        "volume_size": 1024, "stateful": true, "live": true,
        "options": {"postcopy": false, "bandwidth": 1000000},
        "v3_migration_window": "22:00-23:00"
    })
}

/// A simulated v3 source (raw JSON frames) against this v2 target: they
/// agree on v2 and nothing v3-only makes it into the plan — whether the v3
/// peer trims its offer to v2 (as it must) or sends v3 values anyway.
#[tokio::test]
async fn v3_source_and_v2_target_agree_on_v2() {
    for sloppy in [false, true] {
        let (a, b) = duplex(16 * 1024);
        let caps = Capabilities {
            fs: vec![FsTransfer::Archive {
                compression: vec![Compression::None],
            }],
            state: vec![
                StateTransfer::VmQemuLive {
                    features: vec![QemuFeature::AutoConverge, QemuFeature::Xbzrle],
                },
                StateTransfer::StatefulStopFile,
            ],
            state_compression: vec![Compression::None],
            free_bytes: None,
        };
        let target = tokio::spawn(async move {
            target_handshake(&mut FramedChannel::new(b), &local(), caps).await
        });

        let mut v3 = FramedChannel::new(a);
        let hello = json!({"type": "hello", "protocol_version": 3, "min_version": 2,
                           "software_version": "ferry 3.0", "role": "source", "v3_cluster_id": "abc"});
        v3.send_frame(hello.to_string().as_bytes()).await.unwrap();
        let theirs: Value = serde_json::from_slice(&v3.recv_frame().await.unwrap()).unwrap();
        assert_eq!(theirs["type"], "hello");
        let version = agree_version(
            2,
            3,
            theirs["min_version"].as_u64().unwrap() as u32,
            theirs["protocol_version"].as_u64().unwrap() as u32,
        )
        .unwrap();
        assert_eq!(version, 2);
        v3.send_frame(v3_offer(version, sloppy).to_string().as_bytes())
            .await
            .unwrap();
        let resp: Value = serde_json::from_slice(&v3.recv_frame().await.unwrap()).unwrap();
        assert_eq!(resp["type"], "response", "{resp}");
        assert_eq!(
            resp["state"],
            json!([{"type": "vm_qemu_live", "features": ["auto_converge", "xbzrle"]}]),
            "{resp}"
        );
        assert_eq!(
            resp["fs"],
            json!([{"type": "archive", "compression": ["none"]}])
        );

        let st = target
            .await
            .unwrap()
            .expect("v2 target accepts the v3 peer");
        assert!(matches!(st, TargetState::Transfer { version: 2, .. }));
        let plan = st.plan().unwrap();
        assert_eq!(
            plan.state,
            StatePlan::VmQemuLive {
                features: vec![QemuFeature::AutoConverge, QemuFeature::Xbzrle]
            }
        );
        assert_eq!(plan.options.bandwidth, Some(1000000));
    }
}

/// This v2 source against a simulated v3 target: v2 is agreed and the v3
/// target answers in v2 terms; the source's re-check accepts it.
#[tokio::test]
async fn v2_source_and_v3_target_agree_on_v2() {
    let (a, b) = duplex(16 * 1024);
    let source = tokio::spawn(async move {
        source_handshake(&mut FramedChannel::new(a), &local(), container_offer()).await
    });
    let mut v3 = FramedChannel::new(b);
    v3.send_frame(json!({"type": "hello", "protocol_version": 3, "min_version": 2, "software_version": "ferry 3.0", "role": "target"}).to_string().as_bytes())
        .await
        .unwrap();
    let hello: Value = serde_json::from_slice(&v3.recv_frame().await.unwrap()).unwrap();
    assert_eq!(
        (hello["protocol_version"].as_u64(), hello["role"].as_str()),
        (Some(2), Some("source"))
    );
    let offer: Value = serde_json::from_slice(&v3.recv_frame().await.unwrap()).unwrap();
    assert_eq!(offer["type"], "offer");
    let resp = json!({"type": "response", "fs": [{"type": "archive", "compression": ["zstd"]}],
                      "state": [{"type": "criu_page_server"}], "compression": "zstd", "state_compression": "none",
                      "reasons": ["v3 target speaking v2"], "v3_extra": true});
    v3.send_frame(resp.to_string().as_bytes()).await.unwrap();
    let st = source
        .await
        .unwrap()
        .expect("source accepts a v2-shaped response");
    assert!(matches!(st, SourceState::Transfer { version: 2, .. }));
    assert_eq!(
        st.plan().unwrap().reasons,
        vec!["v3 target speaking v2".to_string()]
    );
}

/// A member told to speak the previous version (`--migration-protocol 1`)
/// and a current one, in both roles: they agree on v1, which has no live
/// transfer, so a live container move becomes a stateful stop + state file.
#[tokio::test]
async fn a_member_speaking_the_previous_version_gets_a_stateful_stop() {
    let old = LocalEnd::new(VersionRange::previous_only(), "ferry 0.1");
    for old_is_source in [true, false] {
        let (a, b) = duplex(16 * 1024);
        let (src_end, tgt_end) = if old_is_source {
            (old.clone(), local())
        } else {
            (local(), old.clone())
        };
        let source = tokio::spawn(async move {
            source_handshake(&mut FramedChannel::new(a), &src_end, container_offer()).await
        });
        let target = tokio::spawn(async move {
            target_handshake(&mut FramedChannel::new(b), &tgt_end, target_caps()).await
        });
        let src = source.await.unwrap().expect("source agrees");
        let tgt = target.await.unwrap().expect("target agrees");
        assert!(matches!(src, SourceState::Transfer { version: 1, .. }));
        assert_eq!(src.plan(), tgt.plan());
        let plan = src.plan().unwrap();
        assert_eq!(plan.version, 1);
        assert_eq!(plan.state, StatePlan::StatefulStopFile, "{plan}");
        assert!(!plan.is_live() && plan.is_stateful());
    }
}
