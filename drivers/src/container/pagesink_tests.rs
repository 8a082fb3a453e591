use super::*;

fn header(cmd: u32, flags: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(&(flags << 16 | cmd).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&nr_pages.to_le_bytes());
    h.extend_from_slice(&vaddr.to_le_bytes());
    h.extend_from_slice(&dst_id.to_le_bytes());
    h
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE as usize]
}

/// A dump of one task (image id 5): three pages at 0x401000 (present),
/// one at 0x7f0000000000 (present + lazy), then close.
fn stream() -> Vec<u8> {
    let dst = 5 << 8 | TYPE_TASK;
    [
        header(PS_IOV_OPEN2, 0, 0, 0, dst),
        header(PS_IOV_ADD_F, PE_PRESENT, 3, 0x401000, dst),
        page(1),
        page(2),
        page(3),
        header(PS_IOV_ADD_F, PE_PRESENT | 2, 1, 0x7f00_0000_0000, dst),
        page(4),
        header(PS_IOV_FLUSH_N_CLOSE, 0, 0, 0, 0),
    ]
    .concat()
}

/// The pagemap `criu page-server` writes for `stream()` (layout read from
/// CRIU 4.2.1's own output), with this sink's pages id.
fn expected_pagemap() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    v.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    // PagemapHead { pages_id: 1 << 20 }
    v.extend_from_slice(&[4, 0, 0, 0, 0x08, 0x80, 0x80, 0x40]);
    // PagemapEntry { vaddr 0x401000, compat 0, flags 4, nr_pages 3 }
    v.extend_from_slice(&[
        11, 0, 0, 0, 0x08, 0x80, 0xa0, 0x80, 0x02, 0x10, 0, 0x20, 4, 0x28, 3,
    ]);
    // PagemapEntry { vaddr 0x7f0000000000, compat 0, flags 6, nr_pages 1 }
    let mut e = vec![0x08];
    varint(&mut e, 0x7f00_0000_0000);
    e.extend_from_slice(&[0x10, 0, 0x20, 6, 0x28, 1]);
    v.extend_from_slice(&(e.len() as u32).to_le_bytes());
    v.extend_from_slice(&e);
    v
}

#[test]
fn writes_the_images_criu_writes_whatever_the_chunking() {
    for chunk in [1, 7, 32, 4096, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = PageSink::new(dir.path());
        for part in stream().chunks(chunk) {
            sink.feed(part).unwrap();
        }
        assert!(sink.closed);
        let stats = sink.finish().unwrap();
        assert_eq!(
            stats,
            PageSinkStats {
                pagemaps: 1,
                entries: 2,
                page_bytes: 4 * PAGE
            }
        );
        let pagemap = std::fs::read(dir.path().join("pagemap-5.img")).unwrap();
        assert_eq!(pagemap, expected_pagemap(), "chunk {chunk}");
        let pages = std::fs::read(dir.path().join(format!("pages-{FIRST_PAGES_ID}.img"))).unwrap();
        assert_eq!(pages, [page(1), page(2), page(3), page(4)].concat());
        // OPEN2's "no parent" byte, then the close's u32 0.
        assert_eq!(sink.answers, vec![0, 0, 0, 0, 0]);
    }
}

#[test]
fn shmem_and_several_tasks_get_their_own_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = PageSink::new(dir.path());
    let (t1, t2, shm) = (1 << 8 | TYPE_TASK, 2 << 8 | TYPE_TASK, 9 << 8 | TYPE_SHMEM);
    let s = [
        header(PS_IOV_OPEN2, 0, 0, 0, t1),
        header(PS_IOV_ADD_F, PE_PRESENT, 1, 0x1000, t1),
        page(1),
        header(PS_IOV_OPEN2, 0, 0, 0, t2),
        header(PS_IOV_ADD, 0, 1, 0x2000, t2),
        page(2),
        header(PS_IOV_OPEN, 0, 0, 0, shm),
        header(PS_IOV_ADD_F, PE_PRESENT, 1, 0, shm),
        page(3),
        header(PS_IOV_FLUSH, 0, 0, 0, 0),
        header(PS_IOV_FLUSH_N_CLOSE, 0, 0, 0, 0),
    ]
    .concat();
    sink.feed(&s).unwrap();
    assert_eq!(sink.finish().unwrap().pagemaps, 3);
    for f in ["pagemap-1.img", "pagemap-2.img", "pagemap-shmem-9.img"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    for (i, fill) in [1u8, 2, 3].into_iter().enumerate() {
        let p = dir
            .path()
            .join(format!("pages-{}.img", FIRST_PAGES_ID + i as u32));
        assert_eq!(std::fs::read(p).unwrap(), page(fill));
    }
    // Two OPEN2 answers, no answer to OPEN, two u32 answers to the flushes.
    assert_eq!(sink.answers.len(), 2 + 8);
}

#[test]
fn refuses_what_it_cannot_write_correctly() {
    let dst = 5 << 8 | TYPE_TASK;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "pages before any open",
            header(PS_IOV_ADD_F, PE_PRESENT, 1, 0, dst),
        ),
        (
            "pages for another image",
            [
                header(PS_IOV_OPEN2, 0, 0, 0, dst),
                header(PS_IOV_ADD_F, PE_PRESENT, 1, 0, 6 << 8 | TYPE_TASK),
            ]
            .concat(),
        ),
        (
            "a hole (pre-dump parent)",
            [
                header(PS_IOV_OPEN2, 0, 0, 0, dst),
                header(PS_IOV_ADD_F, 1, 1, 0, dst),
            ]
            .concat(),
        ),
        ("a lazy page request", header(7, 0, 1, 0, dst)),
        (
            "an unknown image type",
            header(PS_IOV_OPEN2, 0, 0, 0, 5 << 8 | 7),
        ),
        (
            "bytes after the close",
            [header(PS_IOV_FLUSH_N_CLOSE, 0, 0, 0, 0), vec![1]].concat(),
        ),
    ];
    for (what, s) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = PageSink::new(dir.path());
        let err = sink.feed(&s).expect_err(what);
        assert!(matches!(err, PageSinkError::Protocol(_)), "{what}: {err}");
    }
}

#[test]
fn a_stream_cut_short_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = PageSink::new(dir.path());
    let s = stream();
    sink.feed(&s[..s.len() - HEADER - 100]).unwrap();
    assert!(!sink.closed);
    let err = sink.finish().unwrap_err();
    assert!(
        err.to_string().contains("ended before the dump closed it"),
        "{err}"
    );
}

#[tokio::test]
async fn answers_reach_a_relay_and_end_with_eof() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (mut criu, mut ours) = tokio::io::duplex(1 << 16);
    let sink_dir = dir.path().to_path_buf();
    let relay = tokio::spawn(async move {
        let mut sink = PageSink::new(&sink_dir);
        let moved = tokio::io::copy_bidirectional(&mut ours, &mut sink).await?;
        sink.finish()?;
        Ok::<_, io::Error>(moved)
    });
    criu.write_all(&stream()).await.unwrap();
    let mut answers = Vec::new();
    criu.read_to_end(&mut answers).await.unwrap();
    assert_eq!(answers, vec![0, 0, 0, 0, 0]);
    criu.shutdown().await.unwrap();
    let (up, down) = relay.await.unwrap().unwrap();
    assert_eq!((up, down), (stream().len() as u64, 5));
}

#[tokio::test]
async fn the_source_end_answers_for_a_silent_sink() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The target side stalls: nothing read from the source end goes on,
    // yet CRIU has its "no parent" answer, and the close's, at once.
    let (mut criu, ours) = tokio::io::duplex(1 << 16);
    let mut src = AnswerForSink::new(ours);
    criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, 5 << 8 | TYPE_TASK))
        .await
        .unwrap();
    let mut taken = vec![0u8; HEADER];
    src.read_exact(&mut taken).await.unwrap();
    let mut answers = [9u8; 5];
    criu.read_exact(&mut answers).await.unwrap();
    assert_eq!(answers, [0; 5]);

    // More opens than prepaid: the source end tops up as it sees them.
    let (mut criu, ours) = tokio::io::duplex(1 << 20);
    let opens = PREPAID as usize + 10;
    let many: Vec<u8> = (0..opens)
        .flat_map(|i| header(PS_IOV_OPEN2, 0, 0, 0, (i as u64) << 8 | TYPE_TASK))
        .collect();
    let reader = tokio::spawn(async move {
        let mut src = AnswerForSink::new(ours);
        let mut sink = Vec::new();
        src.read_to_end(&mut sink).await.map(|_| sink.len())
    });
    criu.write_all(&many).await.unwrap();
    let mut answers = vec![9u8; opens];
    criu.read_exact(&mut answers).await.unwrap();
    assert!(answers.iter().all(|b| *b == 0));
    criu.shutdown().await.unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), many.len());

    // End to end: the sink answers nothing and writes the same images.
    let dir = tempfile::tempdir().unwrap();
    let (mut criu, ours) = tokio::io::duplex(1 << 16);
    let sink_dir = dir.path().to_path_buf();
    let relay = tokio::spawn(async move {
        let mut src = AnswerForSink::new(ours);
        let mut sink = PageSink::new(&sink_dir).answers(false);
        let moved = tokio::io::copy_bidirectional(&mut src, &mut sink).await?;
        sink.finish()?;
        Ok::<_, io::Error>(moved)
    });
    criu.write_all(&stream()).await.unwrap();
    let mut answers = [9u8; 5];
    criu.read_exact(&mut answers).await.unwrap();
    assert_eq!(answers, [0; 5]);
    criu.shutdown().await.unwrap();
    let (_, from_sink) = relay.await.unwrap().unwrap();
    assert_eq!(from_sink, 0, "the sink answered");
    let pagemap = std::fs::read(dir.path().join("pagemap-5.img")).unwrap();
    assert_eq!(pagemap, expected_pagemap());
}

#[tokio::test]
async fn criu_leaving_answers_unread_ends_the_stream_only_after_its_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // CRIU's socket closes with unread prepaid answers: its peer sees a
    // reset. After the close command that is the end of a good stream;
    // before it, an error.
    for complete in [true, false] {
        let (mut criu, ours) = tokio::net::UnixStream::pair().unwrap();
        let mut src = AnswerForSink::new(ours);
        let s = stream();
        let sent = if complete {
            &s[..]
        } else {
            &s[..s.len() - HEADER]
        };
        // Let the source end pay CRIU first, as the relay does.
        let mut first = vec![0u8; HEADER];
        criu.write_all(&sent[..HEADER]).await.unwrap();
        src.read_exact(&mut first).await.unwrap();
        criu.write_all(&sent[HEADER..]).await.unwrap();
        drop(criu);
        let mut rest = Vec::new();
        let r = src.read_to_end(&mut rest).await;
        if complete {
            assert_eq!(r.unwrap(), s.len() - HEADER);
        } else {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        }
    }
}
