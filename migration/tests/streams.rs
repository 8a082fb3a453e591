//! Framing, compressed byte channels and the relay over in-memory pipes.

use std::time::Duration;

use ferry_migration::*;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

fn data(len: usize) -> Vec<u8> {
    // Compressible but not trivial: text-like runs with a xorshift sprinkle.
    let mut x = 0x2545F491u32;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 16 == 0 {
                x as u8
            } else {
                b"ferry moves instances "[i % 22]
            }
        })
        .collect()
}

#[tokio::test]
async fn garbage_frames_are_rejected() {
    let (a, b) = duplex(4096);
    let (mut tx, mut rx) = (FramedChannel::new(a), FramedChannel::new(b));
    tx.send_frame(b"\x00\xffnot json at all").await.unwrap();
    let e = rx.recv().await.unwrap_err();
    assert!(matches!(e, ChannelError::Malformed(_)), "{e}");
    assert!(
        e.to_string().starts_with("malformed control message"),
        "{e}"
    );
    tx.send_frame(br#"{"type":"teleport","to":"mars"}"#)
        .await
        .unwrap();
    assert!(
        matches!(rx.recv().await.unwrap_err(), ChannelError::Malformed(m) if m.contains("teleport"))
    );
    tx.send_frame(br#"{"type":"fs_done","bytes":"many"}"#)
        .await
        .unwrap();
    assert!(matches!(
        rx.recv().await.unwrap_err(),
        ChannelError::Malformed(_)
    ));
    tx.send_frame(b"").await.unwrap();
    assert!(matches!(
        rx.recv().await.unwrap_err(),
        ChannelError::EmptyFrame
    ));
    // The channel stays usable for a well-formed message after a refused one.
    tx.send(&Message::StateReady {}).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Message::StateReady {});
    tx.close().await.unwrap();
    assert!(matches!(rx.recv().await.unwrap_err(), ChannelError::Closed));
}

#[tokio::test]
async fn oversize_frames_are_rejected_without_reading_them() {
    let (mut a, b) = duplex(4096);
    let mut rx = FramedChannel::with_max_frame(b, 1024);
    a.write_all(&(1025u32).to_be_bytes()).await.unwrap();
    let e = rx.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::FrameTooLarge {
                size: 1025,
                max: 1024
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("exceeds the 1024-byte limit"));
    // A 4 GiB length header is refused before any allocation.
    let (mut a, b) = duplex(4096);
    let mut rx = FramedChannel::new(b);
    a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(matches!(
        rx.recv().await.unwrap_err(),
        ChannelError::FrameTooLarge { .. }
    ));
    // The sender refuses too.
    let (a, _b) = duplex(4096);
    let mut tx = FramedChannel::with_max_frame(a, 16);
    assert!(matches!(
        tx.send(&Message::Failure {
            message: "x".repeat(100)
        })
        .await,
        Err(ChannelError::FrameTooLarge { .. })
    ));
    assert!(matches!(
        decode_message(&[b' '; 2000], 1000),
        Err(ChannelError::FrameTooLarge { .. })
    ));
}

#[tokio::test]
async fn truncated_frame_is_reported() {
    let (mut a, b) = duplex(4096);
    let mut rx = FramedChannel::new(b);
    a.write_all(&100u32.to_be_bytes()).await.unwrap();
    a.write_all(b"{\"type\":").await.unwrap();
    drop(a);
    let e = rx.recv().await.unwrap_err();
    assert!(
        matches!(
            e,
            ChannelError::Truncated {
                got: 8,
                expected: 100
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn garbage_during_handshake_is_refused_and_reported_to_the_peer() {
    let (a, b) = duplex(4096);
    let caps = Capabilities::default();
    let target = tokio::spawn(async move {
        target_handshake(
            &mut FramedChannel::new(b),
            &LocalEnd::new(VersionRange::CURRENT, "t"),
            caps,
        )
        .await
    });
    let mut peer = FramedChannel::new(a);
    peer.send_frame(b"GET / HTTP/1.1").await.unwrap();
    assert!(matches!(peer.recv().await.unwrap(), Message::Hello(_)));
    assert!(
        matches!(peer.recv().await.unwrap(), Message::Failure { message } if message.contains("malformed control message"))
    );
    assert!(matches!(
        target.await.unwrap(),
        Err(SessionError::Channel(ChannelError::Malformed(_)))
    ));
}

#[tokio::test]
async fn recv_is_cancel_safe() {
    let (mut a, b) = duplex(4096);
    let mut rx = FramedChannel::new(b);
    let frame = encode_message(&Message::FsDone { bytes: 42 }, DEFAULT_MAX_FRAME).unwrap();
    a.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .unwrap();
    a.write_all(&frame[..5]).await.unwrap();
    // A recv cancelled mid-frame keeps what it read.
    assert!(timeout(Duration::from_millis(50), rx.recv()).await.is_err());
    a.write_all(&frame[5..]).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Message::FsDone { bytes: 42 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_round_trip_10_mib_both_ways() {
    let (a, b) = duplex(256 * 1024);
    let mut left = ByteChannel::new(a, Compression::Zstd).unwrap();
    let mut right = ByteChannel::new(b, Compression::Zstd).unwrap();
    let input = data(10 << 20);
    let (lc, rc) = (left.counters(), right.counters());

    let expect = input.clone();
    let back = data(1 << 20);
    let back2 = back.clone();
    let writer = tokio::spawn(async move {
        // Uneven writes, like an archive writer.
        for (i, chunk) in expect.chunks(70_001).enumerate() {
            left.write_all(chunk).await.unwrap();
            if i % 10 == 0 {
                left.flush().await.unwrap();
            }
        }
        left.shutdown().await.unwrap();
        let mut got = Vec::new();
        left.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, back2, "the return direction arrives intact");
    });
    let mut got = Vec::new();
    right.read_to_end(&mut got).await.unwrap();
    right.write_all(&back).await.unwrap();
    right.shutdown().await.unwrap();
    writer.await.unwrap();

    assert!(got == input, "10 MiB arrive intact");
    assert_eq!(lc.sent.get(), 10 << 20);
    assert_eq!(rc.received.get(), 10 << 20);
    assert_eq!(lc.sent_wire.get(), rc.received_wire.get());
    assert!(
        lc.sent_wire.get() < (10 << 20) / 2,
        "compressed to {} bytes",
        lc.sent_wire.get()
    );
    assert_eq!(rc.sent.get(), 1 << 20);
}

#[tokio::test]
async fn zstd_flush_delivers_without_closing() {
    let (a, b) = duplex(64 * 1024);
    let (mut tx, mut rx) = (
        ByteChannel::new(a, Compression::Zstd).unwrap(),
        ByteChannel::new(b, Compression::Zstd).unwrap(),
    );
    tx.write_all(b"page request 17").await.unwrap();
    tx.flush().await.unwrap();
    let mut buf = [0u8; 15];
    timeout(Duration::from_secs(5), rx.read_exact(&mut buf))
        .await
        .expect("flushed data is readable")
        .unwrap();
    assert_eq!(&buf, b"page request 17");
}

#[tokio::test]
async fn zstd_stream_cut_mid_frame_is_an_error() {
    let (a, mut b) = duplex(1 << 20);
    let mut tx = ByteChannel::new(a, Compression::Zstd).unwrap();
    tx.write_all(&data(100_000)).await.unwrap();
    tx.flush().await.unwrap();
    drop(tx); // no shutdown: the frame never ends
    let mut raw = Vec::new();
    b.read_to_end(&mut raw).await.unwrap();
    let mut rx = ByteChannel::new(std::io::Cursor::new(raw), Compression::Zstd).unwrap();
    let mut got = Vec::new();
    let e = rx.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("ended mid-frame"), "{e}");
}

#[tokio::test]
async fn relay_propagates_half_close_in_each_direction() {
    let (mut qemu, qemu_end) = duplex(8192);
    let (peer_end, mut peer) = duplex(8192);
    let relay = Relay::new("qemu", "state channel");
    let (a_to_b, b_to_a) = relay.counters();
    let task = tokio::spawn(async move { relay.run(qemu_end, peer_end).await });

    qemu.write_all(b"migration stream").await.unwrap();
    qemu.shutdown().await.unwrap(); // source done sending
    let mut got = Vec::new();
    peer.read_to_end(&mut got).await.unwrap(); // EOF propagated
    assert_eq!(got, b"migration stream");
    // The return path still works after the forward direction closed.
    peer.write_all(b"return path").await.unwrap();
    let mut buf = [0u8; 11];
    qemu.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"return path");
    assert!(
        !task.is_finished(),
        "the relay runs until both directions end"
    );
    peer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    qemu.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let stats = timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        stats,
        RelayStats {
            a_to_b: 16,
            b_to_a: 11
        }
    );
    assert_eq!((a_to_b.get(), b_to_a.get()), (16, 11));
}

/// The VM path end to end: source QEMU ⇄ relay ⇄ zstd state channel ⇄ relay
/// ⇄ target QEMU, with a request/response return path (post-copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_through_compressed_channel_with_return_path() {
    let (mut src_qemu, src_fd) = duplex(64 * 1024);
    let (dst_fd, mut dst_qemu) = duplex(64 * 1024);
    let (wire_a, wire_b) = duplex(64 * 1024);
    let src_ch = ByteChannel::new(wire_a, Compression::Zstd).unwrap();
    let dst_ch = ByteChannel::new(wire_b, Compression::Zstd).unwrap();
    let r1 =
        tokio::spawn(async move { Relay::new("source qemu", "state").run(src_fd, src_ch).await });
    let r2 =
        tokio::spawn(async move { Relay::new("state", "target qemu").run(dst_ch, dst_fd).await });

    let stream = data(2 << 20);
    let expect = stream.clone();
    let target = tokio::spawn(async move {
        // Target asks for a page and expects the answer before the bulk ends.
        dst_qemu.write_all(b"REQ7").await.unwrap();
        let mut got = Vec::new();
        dst_qemu.read_to_end(&mut got).await.unwrap();
        dst_qemu.shutdown().await.unwrap();
        got
    });
    let mut req = [0u8; 4];
    src_qemu.read_exact(&mut req).await.unwrap();
    assert_eq!(&req, b"REQ7");
    src_qemu.write_all(&stream).await.unwrap();
    src_qemu.shutdown().await.unwrap();
    assert!(target.await.unwrap() == expect);
    let mut rest = Vec::new();
    src_qemu.read_to_end(&mut rest).await.unwrap();
    let s1 = r1.await.unwrap().unwrap();
    let s2 = r2.await.unwrap().unwrap();
    assert_eq!((s1.a_to_b, s1.b_to_a), (2 << 20, 4));
    assert_eq!((s2.a_to_b, s2.b_to_a), (2 << 20, 4));
}

#[tokio::test]
async fn relay_error_names_the_failing_side() {
    let (qemu_end, qemu) = duplex(1024);
    let (peer_end, peer) = duplex(1024);
    drop(peer); // the state channel is gone
    let relay = Relay::new("qemu", "state channel");
    let task = tokio::spawn(async move { relay.run(qemu_end, peer_end).await });
    let mut qemu = qemu;
    let _ = qemu.write_all(b"x").await;
    let e = timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("relay qemu → state channel: writing to state channel failed"),
        "{e}"
    );
}
