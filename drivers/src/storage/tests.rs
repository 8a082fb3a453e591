//! Round trips and incremental passes over real trees. Ownership, device
//! nodes and security.capability need root; without it those parts are
//! skipped.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::io::Cursor;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::fsops::{self, XTarget};
use super::*;

pub(super) fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    /// File content or symlink target.
    data: Vec<u8>,
    rdev: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For inodes with several names: the first name in walk order.
    link_group: Option<PathBuf>,
}

/// Everything observable about a tree, keyed by relative path ("" = root).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut groups = HashMap::new();
    walk(root, Path::new(""), &mut out, &mut groups);
    out
}

fn walk(
    root: &Path,
    rel: &Path,
    out: &mut BTreeMap<PathBuf, Node>,
    groups: &mut HashMap<u64, PathBuf>,
) {
    let p = root.join(rel);
    let md = fs::symlink_metadata(&p).unwrap();
    let ft = md.file_type();
    let (kind, data) = if ft.is_dir() {
        ("dir", vec![])
    } else if ft.is_file() {
        ("file", fs::read(&p).unwrap())
    } else if ft.is_symlink() {
        (
            "symlink",
            fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
        )
    } else if ft.is_char_device() {
        ("char", vec![])
    } else if ft.is_block_device() {
        ("block", vec![])
    } else if ft.is_fifo() {
        ("fifo", vec![])
    } else {
        ("other", vec![])
    };
    let link_group = (!ft.is_dir() && md.nlink() > 1).then(|| {
        groups
            .entry(md.ino())
            .or_insert_with(|| rel.to_path_buf())
            .clone()
    });
    let parent = fsops::open_dir_path(p.parent().unwrap()).unwrap();
    let name = CString::new(p.file_name().unwrap().as_bytes()).unwrap();
    let xattrs = fsops::get_xattrs(XTarget::At(parent.as_raw_fd(), &name)).unwrap();
    out.insert(
        rel.to_path_buf(),
        Node {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            data,
            rdev: md.rdev(),
            xattrs,
            link_group,
        },
    );
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            walk(root, &rel.join(n), out, groups);
        }
    }
}

pub(super) fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "different paths");
    for (k, na) in &sa {
        assert_eq!(na, &sb[k], "entry {k:?} differs");
    }
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let parent = fsops::open_dir_path(p.parent().unwrap()).unwrap();
    let n = CString::new(p.file_name().unwrap().as_bytes()).unwrap();
    fsops::set_xattr(XTarget::At(parent.as_raw_fd(), &n), name.as_bytes(), value).unwrap();
}

fn set_mtime(p: &Path, sec: i64) {
    let parent = fsops::open_dir_path(p.parent().unwrap()).unwrap();
    let n = CString::new(p.file_name().unwrap().as_bytes()).unwrap();
    fsops::lutimensat(parent.as_raw_fd(), &n, sec, 123_456_789).unwrap();
}

fn mknod(p: &Path, kind: libc::mode_t, mode: u32, dev: libc::dev_t) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) },
        0,
        "mknod {p:?}"
    );
    chmod(p, mode);
}

/// security.capability v2 granting CAP_NET_BIND_SERVICE, effective.
fn cap_net_bind() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// A tree with every kind of entry the format carries.
fn build_tree(src: &Path) {
    fs::create_dir_all(src.join("a/b/empty")).unwrap();
    fs::create_dir_all(src.join("dev")).unwrap();
    fs::write(src.join("a/f.txt"), "hello\n").unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(src.join("a/big"), &big).unwrap();
    fs::write(src.join("a/empty-file"), "").unwrap();
    // Sparse: a hole, 4 KiB of data at 5 MiB, a trailing hole up to 10 MiB.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(src.join("a/sparse")).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.set_len(10 << 20).unwrap();
    }
    symlink("/etc/passwd", src.join("abs-link")).unwrap();
    symlink("../f.txt", src.join("a/b/rel-link")).unwrap();
    symlink("no/such/target", src.join("dangling")).unwrap();
    fs::write(src.join("a/h1"), "linked").unwrap();
    fs::hard_link(src.join("a/h1"), src.join("a/b/h2")).unwrap();
    fs::hard_link(src.join("a/h1"), src.join("h3")).unwrap();
    let fifo = CString::new(src.join("fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    chmod(&src.join("fifo"), 0o640);
    fs::write(src.join("suid"), "#!/bin/sh\n").unwrap();
    chmod(&src.join("suid"), 0o4755);
    fs::create_dir(src.join("tmp")).unwrap();
    chmod(&src.join("tmp"), 0o1777);
    fs::create_dir(src.join("locked")).unwrap();
    fs::write(src.join("locked/inside"), "x").unwrap();
    set_xattr(&src.join("a/f.txt"), "user.test", b"value\0with-nul");
    set_xattr(&src.join("a/b"), "user.dir", b"d");
    set_mtime(&src.join("a/f.txt"), 1_000_000_000);
    set_mtime(&src.join("abs-link"), 1_100_000_000);
    if is_root() {
        mknod(
            &src.join("dev/null"),
            libc::S_IFCHR,
            0o666,
            libc::makedev(1, 3),
        );
        mknod(
            &src.join("dev/loop-ish"),
            libc::S_IFBLK,
            0o660,
            libc::makedev(7, 200),
        );
        fs::write(src.join("owned"), "mine").unwrap();
        std::os::unix::fs::lchown(src.join("owned"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::lchown(src.join("a/b"), Some(1000), Some(1000)).unwrap();
        std::os::unix::fs::lchown(src.join("dangling"), Some(1000), Some(1000)).unwrap();
        fs::write(src.join("cap-bin"), "bin").unwrap();
        chmod(&src.join("cap-bin"), 0o755);
        set_xattr(&src.join("cap-bin"), "security.capability", &cap_net_bind());
    }
    chmod(&src.join("locked"), 0o500);
}

fn full_pass(src: &Path, dst: &Path, record: bool) -> (ArchiveStats, ArchiveStats) {
    let mut buf = Vec::new();
    let opts = ArchiveOptions {
        record_manifest: record,
        ..Default::default()
    };
    let w = write_archive(src, &mut buf, &opts).unwrap();
    assert_eq!(w.archive_bytes, buf.len() as u64);
    let ropts = ExtractOptions {
        allow_devices: true,
        ..Default::default()
    };
    let r = read_archive(&buf[..], dst, &ropts).unwrap();
    (w, r)
}

#[test]
fn round_trip_preserves_everything() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    build_tree(&src);
    let (w, r) = full_pass(&src, &dst, false);
    assert_same_tree(&src, &dst);
    assert_eq!((w.entries, w.bytes), (r.entries, r.bytes));
    assert!(
        w.warnings.is_empty() && r.warnings.is_empty(),
        "{:?} {:?}",
        w.warnings,
        r.warnings
    );
    // The sparse file's hole travelled as a hole and stayed one.
    assert!(
        w.bytes < (5 << 20),
        "holes were sent as data: {} bytes",
        w.bytes
    );
    let md = fs::metadata(dst.join("a/sparse")).unwrap();
    assert_eq!(md.len(), 10 << 20);
    assert!(
        md.blocks() * 512 < (1 << 20),
        "extracted sparse file is not sparse"
    );
    // Spot checks of what the walker compares.
    let dmd = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap();
    assert_eq!(dmd("suid").mode() & 0o7777, 0o4755);
    assert_eq!(dmd("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(dmd("a/h1").ino(), dmd("a/b/h2").ino());
    assert_eq!(dmd("a/h1").ino(), dmd("h3").ino());
    assert!(dmd("fifo").file_type().is_fifo());
    assert_eq!(
        fs::read_link(dst.join("dangling")).unwrap(),
        Path::new("no/such/target")
    );
    if is_root() {
        assert!(dmd("dev/null").file_type().is_char_device());
        assert_eq!(dmd("dev/null").rdev(), libc::makedev(1, 3));
        assert_eq!((dmd("owned").uid(), dmd("owned").gid()), (1000, 1000));
    }
}

#[test]
fn reader_stops_at_the_trailer() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), "x").unwrap();
    let mut buf = Vec::new();
    write_archive(&src, &mut buf, &ArchiveOptions::default()).unwrap();
    let len = buf.len();
    buf.extend_from_slice(b"NEXT ARCHIVE");
    let mut cur = Cursor::new(&buf);
    let s = read_archive(&mut cur, &t.path().join("dst"), &ExtractOptions::default()).unwrap();
    assert_eq!(cur.position() as usize, len);
    assert_eq!(s.archive_bytes as usize, len);
    assert_same_tree(&src, &t.path().join("dst"));
}

#[test]
fn devices_are_refused_unless_allowed() {
    if !is_root() {
        eprintln!("skipped: needs root for mknod");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    mknod(&src.join("null"), libc::S_IFCHR, 0o666, libc::makedev(1, 3));
    let mut buf = Vec::new();
    write_archive(&src, &mut buf, &ArchiveOptions::default()).unwrap();
    let err =
        read_archive(&buf[..], &t.path().join("dst"), &ExtractOptions::default()).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::DeviceNotAllowed { path } if path == "null"),
        "{err}"
    );
    assert!(!t.path().join("dst/null").exists());
}

/// Apply an incremental pass of `src` (against `base`) onto `dst`.
fn incremental(src: &Path, dst: &Path, base: Manifest) -> (ArchiveStats, ArchiveStats) {
    let mut buf = Vec::new();
    let opts = ArchiveOptions {
        base: Some(base),
        record_manifest: true,
        ..Default::default()
    };
    let w = write_archive(src, &mut buf, &opts).unwrap();
    let ropts = ExtractOptions {
        allow_devices: true,
        ..Default::default()
    };
    let r = read_archive(&buf[..], dst, &ropts).unwrap();
    assert_eq!(
        (w.entries, w.bytes, w.deleted),
        (r.entries, r.bytes, r.deleted)
    );
    (w, r)
}

/// On a filesystem with nanosecond timestamps, entries older than
/// `RACY_FINE_MS` are settled (not resent) while one written just before the
/// pass is racy and resent by the next one — even when it then changes
/// within the same timestamp tick with the same size.
#[test]
fn fine_timestamps_narrow_the_racy_window() {
    let t = tempfile::tempdir().unwrap();
    let dir = fs::File::open(t.path()).unwrap();
    if !super::write::fine_timestamps(dir.as_raw_fd()) {
        eprintln!("SKIP: {} has no fine timestamps", t.path().display());
        return;
    }
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    build_tree(&src);
    std::thread::sleep(std::time::Duration::from_millis(
        (super::write::RACY_FINE_MS * 3) as u64,
    ));
    fs::write(src.join("fresh"), "1111").unwrap();
    let (w1, _) = full_pass(&src, &dst, true);
    fs::write(src.join("fresh"), "2222").unwrap();
    let (w2, _) = incremental(&src, &dst, w1.manifest.unwrap());
    // Only `fresh` (and the root, whose ctime changed when it was created).
    assert!(w2.entries <= 2, "settled entries were resent: {w2:?}");
    assert_eq!(fs::read(dst.join("fresh")).unwrap(), b"2222");
    assert_same_tree(&src, &dst);
}

#[test]
fn incremental_pass_applies_changes() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    build_tree(&src);
    fs::create_dir_all(src.join("gone/deep")).unwrap();
    fs::write(src.join("gone/deep/f"), "bye").unwrap();
    fs::write(src.join("becomes-dir"), "file").unwrap();
    fs::create_dir(src.join("becomes-link")).unwrap();
    fs::write(src.join("becomes-link/x"), "x").unwrap();
    fs::write(src.join("same-size"), "AAAA").unwrap();
    // Let the first pass see settled (non-racy) timestamps, so unchanged
    // entries are really skipped by the second pass.
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let (w1, _) = full_pass(&src, &dst, true);
    let base = w1.manifest.clone().unwrap();
    assert_eq!(base.len() as u64, w1.entries);

    // Nothing changed: only the root's children that are racy... none.
    let (w_idle, _) = incremental(&src, &dst, base.clone());
    assert_eq!(
        (w_idle.entries, w_idle.deleted),
        (0, 0),
        "idle pass sent entries"
    );
    assert_same_tree(&src, &dst);

    // Changes while "frozen".
    let old_mtime = fs::metadata(src.join("same-size")).unwrap().mtime();
    fs::write(src.join("same-size"), "BBBB").unwrap();
    set_mtime(&src.join("same-size"), old_mtime); // hide from mtime: ctime still tells
    fs::write(src.join("a/f.txt"), "changed content\n").unwrap();
    fs::write(src.join("a/b/new"), "new file").unwrap();
    fs::create_dir_all(src.join("newdir/sub")).unwrap();
    fs::write(src.join("newdir/sub/f"), "nested").unwrap();
    fs::remove_file(src.join("h3")).unwrap();
    fs::remove_dir_all(src.join("gone")).unwrap();
    fs::remove_file(src.join("becomes-dir")).unwrap();
    fs::create_dir(src.join("becomes-dir")).unwrap();
    fs::write(src.join("becomes-dir/inner"), "i").unwrap();
    fs::remove_dir_all(src.join("becomes-link")).unwrap();
    symlink("a", src.join("becomes-link")).unwrap();
    chmod(&src.join("suid"), 0o755);
    fs::hard_link(src.join("a/empty-file"), src.join("new-link")).unwrap();
    if is_root() {
        set_xattr(&src.join("dangling"), "trusted.x", b"1");
    }
    let (w2, r2) = incremental(&src, &dst, w_idle.manifest.unwrap());
    assert_same_tree(&src, &dst);
    assert!(
        w2.entries < w1.entries,
        "incremental sent {} of {}",
        w2.entries,
        w1.entries
    );
    assert!(
        w2.bytes < 1000,
        "unchanged big files were resent ({} bytes)",
        w2.bytes
    );
    assert_eq!(
        w2.deleted, 5,
        "h3, gone, gone/deep, gone/deep/f, becomes-link/x"
    );
    assert!(r2.warnings.is_empty(), "{:?}", r2.warnings);
}

#[test]
fn incremental_replaces_a_planted_symlink_without_following_it() {
    // The target tree holds a symlink where the source has a file: the pass
    // replaces the link itself and never writes through it.
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    fs::create_dir(&src).unwrap();
    fs::write(&outside, "precious").unwrap();
    fs::write(src.join("f"), "v1").unwrap();
    let (w1, _) = full_pass(&src, &dst, true);
    fs::remove_file(dst.join("f")).unwrap();
    symlink(&outside, dst.join("f")).unwrap();
    fs::write(src.join("f"), "v2").unwrap();
    incremental(&src, &dst, w1.manifest.unwrap());
    assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
    assert!(fs::symlink_metadata(dst.join("f")).unwrap().is_file());
    assert_eq!(fs::read_to_string(dst.join("f")).unwrap(), "v2");
}

#[test]
fn progress_counters_follow_the_pass() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), vec![1u8; 100_000]).unwrap();
    let p = std::sync::Arc::new(Progress::default());
    let opts = ArchiveOptions {
        progress: Some(p.clone()),
        ..Default::default()
    };
    let s = write_archive(&src, std::io::sink(), &opts).unwrap();
    assert_eq!((p.entries(), p.bytes()), (2, 100_000));
    assert_eq!((s.entries, s.bytes), (2, 100_000));
}

#[test]
fn sockets_and_mount_points_are_skipped_with_warnings() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("mnt")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let mnt = CString::new(src.join("mnt").as_os_str().as_bytes()).unwrap();
    let mounted = is_root()
        && unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                mnt.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        } == 0;
    if mounted {
        fs::write(src.join("mnt/inside"), "not archived").unwrap();
    }
    let mut buf = Vec::new();
    let res = write_archive(&src, &mut buf, &ArchiveOptions::default());
    if mounted {
        unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_DETACH) };
    }
    let w = res.unwrap();
    assert!(
        w.warnings.iter().any(|m| m.contains("`sock` is a socket")),
        "{:?}",
        w.warnings
    );
    read_archive(&buf[..], &dst, &ExtractOptions::default()).unwrap();
    assert!(!dst.join("sock").exists());
    assert!(dst.join("mnt").is_dir());
    if mounted {
        assert!(
            w.warnings
                .iter()
                .any(|m| m.contains("`mnt` is a mount point")),
            "{:?}",
            w.warnings
        );
        assert!(!dst.join("mnt/inside").exists());
    } else {
        eprintln!("mount point part skipped: cannot mount tmpfs here");
    }
}
