//! Hand-crafted hostile archives: each must be refused with a precise error
//! and nothing may be written outside the destination.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::format::{Enc, Kind, Meta, FLAG_INCREMENTAL, MAGIC};
use super::tests::is_root;
use super::*;

/// Archive builder on top of the real encoder.
struct Craft {
    e: Enc<Vec<u8>>,
    entries: u64,
    deleted: u64,
    bytes: u64,
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_600_000_000,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

impl Craft {
    fn new(flags: u16) -> Craft {
        let mut e = Enc::new(Vec::new());
        e.header(flags).unwrap();
        let mut c = Craft {
            e,
            entries: 0,
            deleted: 0,
            bytes: 0,
        };
        if flags & FLAG_INCREMENTAL == 0 {
            c.dir(".");
        }
        c
    }
    fn start(&mut self, path: &str, kind: Kind) {
        self.e.entry_start(path.as_bytes(), kind, 0).unwrap();
        self.entries += 1;
    }
    fn dir(&mut self, path: &str) -> &mut Self {
        self.start(path, Kind::Dir);
        self.e.meta(&meta(0o755)).unwrap();
        self
    }
    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.start(path, Kind::File);
        self.e.meta(&meta(0o644)).unwrap();
        if !data.is_empty() {
            self.e.chunk_data(data).unwrap();
        }
        self.e.chunk_end().unwrap();
        self.bytes += data.len() as u64;
        self
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.start(path, Kind::Symlink);
        self.e.meta(&meta(0o777)).unwrap();
        self.e.bytes16(target.as_bytes()).unwrap();
        self
    }
    fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
        self.start(path, Kind::HardLink);
        self.e.bytes16(target.as_bytes()).unwrap();
        self
    }
    fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.start(path, Kind::Char);
        self.e.meta(&meta(0o666)).unwrap();
        self.e.u32(major).unwrap();
        self.e.u32(minor).unwrap();
        self
    }
    fn delete(&mut self, path: &str) -> &mut Self {
        self.e.delete(path.as_bytes()).unwrap();
        self.deleted += 1;
        self
    }
    fn finish(&mut self) -> Vec<u8> {
        self.e
            .trailer(self.entries, self.deleted, self.bytes)
            .unwrap();
        std::mem::take(&mut self.e.w)
    }
}

/// A scratch area: `dest` to extract into, and a sibling `outside/` that
/// must stay untouched.
struct Scratch {
    _t: tempfile::TempDir,
    dest: PathBuf,
    outside: PathBuf,
}

fn scratch() -> Scratch {
    let t = tempfile::tempdir().unwrap();
    let (dest, outside) = (t.path().join("w/dest"), t.path().join("outside"));
    fs::create_dir_all(t.path().join("w")).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("passwd"), "root:x:0:0\n").unwrap();
    Scratch {
        _t: t,
        dest,
        outside,
    }
}

impl Scratch {
    fn extract(&self, archive: &[u8]) -> Result<ArchiveStats, ArchiveError> {
        read_archive(archive, &self.dest, &ExtractOptions::default())
    }
    /// Nothing appeared next to `dest` or in `outside/`.
    fn assert_contained(&self) {
        let w: Vec<_> = fs::read_dir(self.dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(w.iter().all(|n| n == "dest"), "written outside dest: {w:?}");
        let o: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(o, vec!["passwd"], "outside/ changed");
        assert_eq!(
            fs::read_to_string(self.outside.join("passwd")).unwrap(),
            "root:x:0:0\n"
        );
    }
}

fn expect_unsafe(err: ArchiveError, path: &str, reason_has: &str) {
    match &err {
        ArchiveError::Unsafe { path: p, reason } if p == path && reason.contains(reason_has) => {}
        _ => panic!("expected Unsafe {{ {path}, ..{reason_has}.. }}, got: {err:?}"),
    }
}

#[test]
fn dotdot_path_is_refused() {
    let s = scratch();
    let err = s
        .extract(&Craft::new(0).file("../escape", b"x").finish())
        .unwrap_err();
    expect_unsafe(err, "../escape", "`..` path component");
    let err = scratch()
        .extract(&Craft::new(0).dir("a").file("a/../../escape", b"x").finish())
        .unwrap_err();
    expect_unsafe(err, "a/../../escape", "`..`");
    s.assert_contained();
}

#[test]
fn absolute_path_is_refused() {
    let s = scratch();
    let abs = format!("{}/abs", s.outside.display());
    let err = s
        .extract(&Craft::new(0).file(&abs, b"x").finish())
        .unwrap_err();
    expect_unsafe(err, &abs, "absolute path");
    s.assert_contained();
}

#[test]
fn nul_and_overlong_paths_are_refused() {
    let s = scratch();
    let err = s
        .extract(&Craft::new(0).file("a\0b", b"x").finish())
        .unwrap_err();
    expect_unsafe(err, "a\\x00b", "NUL");
    let long = "x".repeat(300);
    let err = s
        .extract(&Craft::new(0).file(&long, b"x").finish())
        .unwrap_err();
    expect_unsafe(err, &long, "longer than 255");
    let opts = ExtractOptions {
        max_path_len: 10,
        ..Default::default()
    };
    let err = read_archive(
        &Craft::new(0).file("abcdefghijk", b"").finish()[..],
        &scratch().dest,
        &opts,
    )
    .unwrap_err();
    expect_unsafe(err, "abcdefghijk", "longer than the limit 10");
}

#[test]
fn file_through_a_symlink_is_refused() {
    let s = scratch();
    let target = s.outside.display().to_string();
    let archive = Craft::new(0)
        .symlink("a", &target)
        .file("a/x", b"pwned")
        .finish();
    let err = s.extract(&archive).unwrap_err();
    expect_unsafe(err, "a/x", "parent `a` is a symlink");
    // Same with a relative link climbing out, and with a directory entry.
    let archive = Craft::new(0)
        .symlink("up", "../../outside")
        .dir("up/d")
        .finish();
    expect_unsafe(
        s_extract_fresh(&archive),
        "up/d",
        "parent `up` is a symlink",
    );
    // A symlink to /tmp, as in the brief: /tmp/<x> must not appear.
    let name = format!("ferry-archive-test-{}", std::process::id());
    let archive = Craft::new(0)
        .symlink("t", "/tmp")
        .file(&format!("t/{name}"), b"x")
        .finish();
    expect_unsafe(
        s_extract_fresh(&archive),
        &format!("t/{name}"),
        "is a symlink",
    );
    assert!(!Path::new("/tmp").join(&name).exists());
    s.assert_contained();
}

fn s_extract_fresh(archive: &[u8]) -> ArchiveError {
    let s = scratch();
    let err = s.extract(archive).unwrap_err();
    s.assert_contained();
    err
}

#[test]
fn hard_links_must_stay_inside_and_name_earlier_entries() {
    let err = s_extract_fresh(&Craft::new(0).hard_link("p", "../../etc/passwd").finish());
    expect_unsafe(
        err,
        "p",
        "hard link target `../../etc/passwd`: `..` path component",
    );
    let err = s_extract_fresh(&Craft::new(0).hard_link("p", "/etc/passwd").finish());
    expect_unsafe(err, "p", "absolute path");
    // Not seen yet (even though it comes later).
    let err = s_extract_fresh(
        &Craft::new(0)
            .hard_link("p", "later")
            .file("later", b"x")
            .finish(),
    );
    expect_unsafe(err, "p", "not an earlier entry");
    // Through a symlinked parent that points outside.
    let s = scratch();
    let out = s.outside.display().to_string();
    let archive = Craft::new(0)
        .symlink("o", &out)
        .hard_link("p", "o/passwd")
        .finish();
    expect_unsafe(
        s.extract(&archive).unwrap_err(),
        "p",
        "not an earlier entry",
    );
    s.assert_contained();
    // Incremental passes may link to existing names, still never through symlinks.
    let s = scratch();
    fs::create_dir(&s.dest).unwrap();
    symlink(&s.outside, s.dest.join("o")).unwrap();
    let archive = Craft::new(FLAG_INCREMENTAL)
        .hard_link("p", "o/passwd")
        .finish();
    expect_unsafe(
        s.extract(&archive).unwrap_err(),
        "p",
        "parent `o` is a symlink",
    );
    s.assert_contained();
}

#[test]
fn device_node_refused_when_not_allowed() {
    let s = scratch();
    let err = s
        .extract(&Craft::new(0).char_dev("mem", 1, 1).finish())
        .unwrap_err();
    assert!(
        matches!(&err, ArchiveError::DeviceNotAllowed { path } if path == "mem"),
        "{err:?}"
    );
    assert!(!s.dest.join("mem").exists());
    assert!(err.to_string().contains("`mem`"));
    s.assert_contained();
}

#[test]
fn bad_magic_and_versions_are_refused() {
    let good = Craft::new(0).finish();
    let mut bad = good.clone();
    bad[..8].copy_from_slice(b"GNUTAR\0\0");
    assert!(matches!(
        s_extract_fresh(&bad),
        ArchiveError::BadMagic { .. }
    ));
    for v in [0u16, VERSION + 1] {
        let mut b = good.clone();
        b[8..10].copy_from_slice(&v.to_le_bytes());
        match s_extract_fresh(&b) {
            ArchiveError::UnsupportedVersion { found, .. } => assert_eq!(found, v),
            e => panic!("{e:?}"),
        }
    }
    let mut b = good.clone();
    b[10] = 0x80; // unknown flag
    assert!(matches!(
        s_extract_fresh(&b),
        ArchiveError::Malformed { .. }
    ));
    assert!(matches!(
        s_extract_fresh(b"FERRY"),
        ArchiveError::Truncated { .. }
    ));
    assert!(matches!(
        s_extract_fresh(&[]),
        ArchiveError::Truncated { .. }
    ));
}

#[test]
fn every_truncation_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), "some content").unwrap();
    symlink("d/f", src.join("l")).unwrap();
    fs::hard_link(src.join("d/f"), src.join("h")).unwrap();
    let mut full = Vec::new();
    write_archive(&src, &mut full, &ArchiveOptions::default()).unwrap();
    for cut in 0..full.len() {
        let dest = t.path().join(format!("dst{cut}"));
        match read_archive(&full[..cut], &dest, &ExtractOptions::default()) {
            Err(ArchiveError::Truncated { .. }) => {}
            other => panic!("cut at {cut}/{}: {other:?}", full.len()),
        }
        fs::remove_dir_all(&dest).ok();
    }
    read_archive(&full[..], &t.path().join("ok"), &ExtractOptions::default()).unwrap();
}

#[test]
fn trailer_must_match() {
    let mut c = Craft::new(0);
    c.file("f", b"abc");
    c.bytes += 1;
    match s_extract_fresh(&c.finish()) {
        ArchiveError::Trailer {
            what,
            declared,
            seen,
        } => {
            assert_eq!((what, declared, seen), ("content bytes", 4, 3))
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn limits_are_enforced() {
    let s = scratch();
    let archive = Craft::new(0)
        .file("a", &[0u8; 600])
        .file("b", &[0u8; 600])
        .finish();
    let opts = ExtractOptions {
        max_total_bytes: Some(1000),
        ..Default::default()
    };
    let err = read_archive(&archive[..], &s.dest, &opts).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Limit { path, .. } if path == "b"),
        "{err:?}"
    );
    // A huge hole counts too.
    let mut c = Craft::new(0);
    c.start("sparse", Kind::File);
    c.e.meta(&meta(0o644)).unwrap();
    c.e.chunk_hole(1 << 50).unwrap();
    c.e.chunk_end().unwrap();
    let err = read_archive(&c.finish()[..], &scratch().dest, &opts).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Limit { path, .. } if path == "sparse"),
        "{err:?}"
    );
    let opts = ExtractOptions {
        max_entries: Some(2),
        ..Default::default()
    };
    let archive = Craft::new(0).file("a", b"").file("b", b"").finish();
    let err = read_archive(&archive[..], &scratch().dest, &opts).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Limit { path, .. } if path == "b"),
        "{err:?}"
    );
}

#[test]
fn structural_errors_are_refused() {
    // Duplicate entry in a full archive.
    let err = s_extract_fresh(&Craft::new(0).file("f", b"1").file("f", b"2").finish());
    assert!(
        matches!(&err, ArchiveError::Malformed { context, .. } if context == "entry `f`"),
        "{err:?}"
    );
    // Child before its parent.
    let err = s_extract_fresh(&Craft::new(0).file("d/f", b"1").finish());
    expect_unsafe(err, "d/f", "parent directory `d` does not exist");
    // Root entry that is not a directory.
    let mut c = Craft::new(FLAG_INCREMENTAL);
    c.symlink(".", "/");
    let s = scratch();
    fs::create_dir(&s.dest).unwrap();
    expect_unsafe(
        s.extract(&c.finish()).unwrap_err(),
        ".",
        "must be a directory",
    );
    // Unknown record tag.
    let mut c = Craft::new(0);
    c.e.u8(b'?').unwrap();
    assert!(matches!(
        s_extract_fresh(&c.finish()),
        ArchiveError::Malformed { .. }
    ));
    // Deletions only in incremental archives.
    assert!(matches!(
        s_extract_fresh(&Craft::new(0).delete("x").finish()),
        ArchiveError::Malformed { .. }
    ));
    // Full archive into a non-empty destination.
    let s = scratch();
    fs::create_dir(&s.dest).unwrap();
    fs::write(s.dest.join("existing"), "").unwrap();
    assert!(matches!(
        s.extract(&Craft::new(0).finish()).unwrap_err(),
        ArchiveError::Destination { .. }
    ));
    // Wrong magic is checked before anything touches the destination.
    let s = scratch();
    assert!(s.extract(&MAGIC[..4]).is_err());
    assert!(!s.dest.exists());
}

#[test]
fn deletions_never_follow_symlinks() {
    let s = scratch();
    fs::create_dir(&s.dest).unwrap();
    symlink(&s.outside, s.dest.join("o")).unwrap();
    let archive = Craft::new(FLAG_INCREMENTAL).delete("o/passwd").finish();
    s.extract(&archive).unwrap();
    s.assert_contained();
    let err = s
        .extract(
            &Craft::new(FLAG_INCREMENTAL)
                .delete("../outside/passwd")
                .finish(),
        )
        .unwrap_err();
    expect_unsafe(err, "../outside/passwd", "`..`");
    let err = s
        .extract(&Craft::new(FLAG_INCREMENTAL).delete(".").finish())
        .unwrap_err();
    expect_unsafe(err, ".", "root cannot be deleted");
    // Deleting the symlink itself removes the link, not its target.
    s.extract(&Craft::new(FLAG_INCREMENTAL).delete("o").finish())
        .unwrap();
    assert!(fs::symlink_metadata(s.dest.join("o")).is_err());
    s.assert_contained();
}

#[test]
fn failed_extraction_names_the_entry_in_its_message() {
    let s = scratch();
    let target = s.outside.display().to_string();
    let err = s
        .extract(
            &Craft::new(0)
                .symlink("a", &target)
                .file("a/x", b"")
                .finish(),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`a/x`") && msg.contains("symlink"), "{msg}");
    if is_root() {
        // Root bypasses permission bits: the reader's refusal must not rely on them.
        s.assert_contained();
    }
}
