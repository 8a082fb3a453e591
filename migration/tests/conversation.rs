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
    ch.send(&Message::Resumed {}).await?;
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

    assert!(matches!(src, SourceState::Done { version: 1, .. }));
    assert!(matches!(tgt, TargetState::Done { version: 1, .. }));
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
            lazy_pages: false
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
    assert!(matches!(peer.recv().await.unwrap(), Message::Hello(h) if h.protocol_version == 1));
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

/// What a v2 build would know: each value with the version that added it.
const V2_QEMU_FEATURES: &[(&str, u32)] = &[
    ("auto_converge", 1),
    ("xbzrle", 1),
    ("dirty_limit", 2),
    ("postcopy", 1),
];

fn v2_offer(version: u32, sloppy: bool) -> Value {
    let features: Vec<&str> = V2_QEMU_FEATURES
        .iter()
        .filter(|(_, since)| sloppy || *since <= version)
        .map(|(f, _)| *f)
        .collect();
    let mut state = vec![
        json!({"type": "vm_qemu_live", "features": features}),
        json!({"type": "stateful_stop_file"}),
    ];
    if sloppy || version >= 2 {
        state.insert(0, json!({"type": "vm_qemu_multifd", "channels": 4}));
    }
    json!({
        "type": "offer", "instance_type": "vm",
        "fs": [{"type": "archive", "compression": ["zstd", "none"]}],
        "state": state,
        "volume_size": 1024, "stateful": true, "live": true,
        "options": {"postcopy": false, "bandwidth": 1000000},
        "v2_migration_window": "22:00-23:00"
    })
}

/// A simulated v2 source (raw JSON frames) against this v1 target: they
/// agree on v1 and nothing v2-only makes it into the plan — whether the v2
/// peer trims its offer to v1 (as it must) or sends v2 values anyway.
#[tokio::test]
async fn v2_source_and_v1_target_agree_on_v1() {
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

        let mut v2 = FramedChannel::new(a);
        let hello = json!({"type": "hello", "protocol_version": 2, "min_version": 1,
                           "software_version": "ferry 2.0", "role": "source", "v2_cluster_id": "abc"});
        v2.send_frame(hello.to_string().as_bytes()).await.unwrap();
        let theirs: Value = serde_json::from_slice(&v2.recv_frame().await.unwrap()).unwrap();
        assert_eq!(theirs["type"], "hello");
        let version = agree_version(
            1,
            2,
            theirs["min_version"].as_u64().unwrap() as u32,
            theirs["protocol_version"].as_u64().unwrap() as u32,
        )
        .unwrap();
        assert_eq!(version, 1);
        v2.send_frame(v2_offer(version, sloppy).to_string().as_bytes())
            .await
            .unwrap();
        let resp: Value = serde_json::from_slice(&v2.recv_frame().await.unwrap()).unwrap();
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
            .expect("v1 target accepts the v2 peer");
        assert!(matches!(st, TargetState::Transfer { version: 1, .. }));
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

/// This v1 source against a simulated v2 target: v1 is agreed and the v2
/// target answers in v1 terms; the source's re-check accepts it.
#[tokio::test]
async fn v1_source_and_v2_target_agree_on_v1() {
    let (a, b) = duplex(16 * 1024);
    let source = tokio::spawn(async move {
        source_handshake(&mut FramedChannel::new(a), &local(), container_offer()).await
    });
    let mut v2 = FramedChannel::new(b);
    v2.send_frame(json!({"type": "hello", "protocol_version": 2, "min_version": 1, "software_version": "ferry 2.0", "role": "target"}).to_string().as_bytes())
        .await
        .unwrap();
    let hello: Value = serde_json::from_slice(&v2.recv_frame().await.unwrap()).unwrap();
    assert_eq!(
        (hello["protocol_version"].as_u64(), hello["role"].as_str()),
        (Some(1), Some("source"))
    );
    let offer: Value = serde_json::from_slice(&v2.recv_frame().await.unwrap()).unwrap();
    assert_eq!(offer["type"], "offer");
    let resp = json!({"type": "response", "fs": [{"type": "archive", "compression": ["zstd"]}],
                      "state": [{"type": "criu_page_server"}], "compression": "zstd", "state_compression": "none",
                      "reasons": ["v2 target speaking v1"], "v2_extra": true});
    v2.send_frame(resp.to_string().as_bytes()).await.unwrap();
    let st = source
        .await
        .unwrap()
        .expect("source accepts a v1-shaped response");
    assert!(matches!(st, SourceState::Transfer { version: 1, .. }));
    assert_eq!(
        st.plan().unwrap().reasons,
        vec!["v2 target speaking v1".to_string()]
    );
}
