use super::*;

fn roundtrip(enc: &mut FrameEncoder, dec: &mut FrameDecoder, data: &[u8]) -> Vec<u8> {
    let f = enc.encode(data).unwrap();
    let out = dec.decode(&f).unwrap().to_vec();
    assert_eq!(out, data);
    f
}

/// Pages like a guest's: zeros with one small value each.
fn sparse_pages(n: usize, seed: u32) -> Vec<u8> {
    let mut v = vec![0u8; n * 4096];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        page[..4].copy_from_slice(&(seed.wrapping_add(i as u32)).to_le_bytes());
    }
    v
}

/// xorshift bytes: do not compress.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn compressible_frames_shrink_and_come_back_identical() {
    let (mut e, mut d) = (FrameEncoder::new().unwrap(), FrameDecoder::new().unwrap());
    let data = sparse_pages(64, 7);
    let f = roundtrip(&mut e, &mut d, &data);
    assert_eq!(f[0], TAG_ZSTD);
    assert!(f.len() < data.len() / 20, "{} of {}", f.len(), data.len());
    let s = e.stats();
    assert_eq!((s.frames, s.compressed_frames, s.misses), (1, 1, 0));
    assert_eq!(s.raw_bytes, data.len() as u64);
    assert_eq!(s.wire_bytes, f.len() as u64);
}

#[test]
fn small_frames_go_raw() {
    let (mut e, mut d) = (FrameEncoder::new().unwrap(), FrameDecoder::new().unwrap());
    let f = roundtrip(&mut e, &mut d, &[0u8; 100]);
    assert_eq!(f[0], TAG_RAW);
    assert_eq!(f.len(), 101);
}

#[test]
fn incompressible_data_backs_off_exponentially_and_recovers() {
    let (mut e, mut d) = (FrameEncoder::new().unwrap(), FrameDecoder::new().unwrap());
    let mut tags = vec![];
    for i in 0..200u64 {
        let f = roundtrip(&mut e, &mut d, &noise(64 * 1024, i + 1));
        tags.push(f[0]);
    }
    assert!(tags.iter().all(|t| *t == TAG_RAW));
    // Attempts at frames 0, 2, 5, 10, 19, 36, 69, 134, 199 (backoff 1, 2, 4 … 64, 64).
    let s = e.stats();
    assert_eq!(s.misses, 9, "{s:?}");
    assert_eq!(s.compressed_frames, 0);
    // Compressible data again: compressed once the current backoff is over.
    let mut first_zstd = None;
    for i in 0..100 {
        let f = roundtrip(&mut e, &mut d, &sparse_pages(16, i));
        if f[0] == TAG_ZSTD {
            first_zstd.get_or_insert(i);
        }
    }
    let first = first_zstd.expect("compression resumed");
    assert!(first <= MAX_BACKOFF, "{first}");
    assert_eq!(e.stats().misses, 9);
}

#[test]
fn bad_frames_are_refused() {
    let mut d = FrameDecoder::new().unwrap();
    assert!(matches!(d.decode(&[]), Err(FrameError::Truncated(0))));
    assert!(matches!(
        d.decode(&[7, 1, 2]),
        Err(FrameError::UnknownTag(7))
    ));
    assert!(matches!(
        d.decode(&[TAG_ZSTD, 1, 0]),
        Err(FrameError::Truncated(3))
    ));
    // A bomb is refused before anything is allocated or decoded.
    let mut bomb = vec![TAG_ZSTD];
    bomb.extend_from_slice(&(u32::MAX).to_le_bytes());
    assert!(matches!(d.decode(&bomb), Err(FrameError::TooLarge(_))));
    // A lying length.
    let mut e = FrameEncoder::new().unwrap();
    let mut f = e.encode(&sparse_pages(4, 1)).unwrap();
    assert_eq!(f[0], TAG_ZSTD);
    f[1..5].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(d.decode(&f), Err(FrameError::Corrupt { .. })));
    // Garbage instead of zstd.
    let mut g = vec![TAG_ZSTD];
    g.extend_from_slice(&4096u32.to_le_bytes());
    g.extend_from_slice(&[0xAB; 64]);
    assert!(matches!(d.decode(&g), Err(FrameError::Corrupt { .. })));
}

#[test]
fn ack_frames_carry_the_count_and_are_no_data() {
    let f = ack_frame(5 << 20);
    assert_eq!(f.len(), 9);
    assert_eq!(parse_ack(&f).unwrap(), Some(5 << 20));
    // Data frames are no acks.
    assert_eq!(parse_ack(&[TAG_RAW, 1, 2, 3]).unwrap(), None);
    assert!(matches!(
        parse_ack(&[TAG_ACK, 1, 2]),
        Err(FrameError::Truncated(3))
    ));
    // A decoder for plain zstd_frames refuses them.
    let mut dec = FrameDecoder::new().unwrap();
    assert!(matches!(
        dec.decode(&f),
        Err(FrameError::UnknownTag(TAG_ACK))
    ));
}
