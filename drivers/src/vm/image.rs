//! The `testvm` disk image: assembling the guest (nasm) into the member's image
//! cache, and patching its parameter block into an instance's disk.
//!
//! Layout (see `testvm.asm`): sector 0 is the boot sector with the parameter
//! block at byte [`PARAMS_OFFSET`]; the following sectors hold the 64-bit
//! code. The instance disk is the template padded to [`DISK_SIZE`] (sparse).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::config::VmConfig;
use crate::DriverError;

/// The guest's source, assembled when the image cache is built.
pub const TESTVM_ASM: &str = include_str!("testvm.asm");

/// Byte offset of the parameter block in the disk image.
pub const PARAMS_OFFSET: usize = 0x1c0;
/// Parameter block magic ("FPRM" little-endian).
pub const PARAMS_MAGIC: u32 = 0x4d52_5046;
pub const PARAMS_VERSION: u16 = 1;
pub const PARAMS_SIZE: usize = 24;
/// Size of an instance disk (sparse; SeaBIOS wants more than a few sectors).
pub const DISK_SIZE: u64 = 1 << 20;
/// Guest-physical address of the guest's u64 pass counter.
pub const COUNTER_ADDR: u64 = 0x9000;

/// The parameter block as the guest reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestParams {
    pub map_2m: u32,
    pub dirty_start_mib: u32,
    pub dirty_mib: u32,
    pub interval_ms: u32,
}

impl GuestParams {
    pub fn from_config(c: &VmConfig) -> Self {
        GuestParams {
            map_2m: c.map_2m_pages(),
            dirty_start_mib: c.dirty_start_mib,
            dirty_mib: c.dirty_mib,
            interval_ms: c.interval_ms,
        }
    }

    pub fn encode(&self) -> [u8; PARAMS_SIZE] {
        let mut b = [0u8; PARAMS_SIZE];
        b[0..4].copy_from_slice(&PARAMS_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PARAMS_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(PARAMS_SIZE as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.map_2m.to_le_bytes());
        b[12..16].copy_from_slice(&self.dirty_start_mib.to_le_bytes());
        b[16..20].copy_from_slice(&self.dirty_mib.to_le_bytes());
        b[20..24].copy_from_slice(&self.interval_ms.to_le_bytes());
        b
    }
}

/// Check that `image` starts with a testvm boot sector carrying a parameter
/// block of the version we write.
pub fn check_template(image: &[u8]) -> Result<(), String> {
    if image.len() < 1024 || image.len() & 511 != 0 {
        return Err(format!(
            "size {} is not a boot sector plus code sectors",
            image.len()
        ));
    }
    if image[510..512] != [0x55, 0xaa] {
        return Err("no boot signature".into());
    }
    let p = &image[PARAMS_OFFSET..PARAMS_OFFSET + 8];
    let magic = u32::from_le_bytes(p[0..4].try_into().unwrap());
    let version = u16::from_le_bytes(p[4..6].try_into().unwrap());
    let size = u16::from_le_bytes(p[6..8].try_into().unwrap());
    if magic != PARAMS_MAGIC || version != PARAMS_VERSION || size as usize != PARAMS_SIZE {
        return Err(format!(
            "parameter block magic/version/size {magic:#x}/{version}/{size} not as expected"
        ));
    }
    Ok(())
}

/// Patch the parameter block into an image held in memory.
pub fn patch_params(image: &mut [u8], params: &GuestParams) -> Result<(), String> {
    check_template(image)?;
    image[PARAMS_OFFSET..PARAMS_OFFSET + PARAMS_SIZE].copy_from_slice(&params.encode());
    Ok(())
}

/// FNV-1a 64: a stable name for the cached template of this guest source.
fn source_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Path of the assembled template in the image cache.
pub fn template_path(images: &Path) -> PathBuf {
    images.join(format!("testvm-{:016x}.bin", source_hash(TESTVM_ASM)))
}

/// Assemble the guest into the image cache unless it is there already.
/// Atomic: assembled under a temporary name, checked, then renamed.
pub async fn ensure_template(images: &Path) -> Result<PathBuf, DriverError> {
    let path = template_path(images);
    if path.exists() {
        return Ok(path);
    }
    tokio::fs::create_dir_all(images)
        .await
        .map_err(DriverError::io(format!("create {}", images.display())))?;
    let tmp = images.join(format!(".testvm-build-{}", std::process::id()));
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(DriverError::io(format!("create {}", tmp.display())))?;
    let result = assemble(&tmp, &path).await;
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    result.map(|_| path)
}

async fn assemble(tmp: &Path, dest: &Path) -> Result<(), DriverError> {
    let src = tmp.join("testvm.asm");
    let out = tmp.join("testvm.bin");
    tokio::fs::write(&src, TESTVM_ASM)
        .await
        .map_err(DriverError::io(format!("write {}", src.display())))?;
    let run = Command::new("nasm")
        .arg("-f")
        .arg("bin")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .await;
    let run = match run {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DriverError::MissingTool {
                tool: "nasm".into(),
                detail: "not found in PATH".into(),
            })
        }
        Err(e) => return Err(DriverError::io("run nasm")(e)),
    };
    if !run.status.success() {
        return Err(DriverError::Command {
            program: "nasm".into(),
            detail: format!(
                "assembling the testvm guest: {}",
                String::from_utf8_lossy(&run.stderr).trim()
            ),
        });
    }
    let bytes = tokio::fs::read(&out)
        .await
        .map_err(DriverError::io(format!("read {}", out.display())))?;
    check_template(&bytes).map_err(|e| DriverError::Command {
        program: "nasm".into(),
        detail: format!("bad testvm image: {e}"),
    })?;
    tokio::fs::rename(&out, dest)
        .await
        .map_err(DriverError::io(format!(
            "rename {} to {}",
            out.display(),
            dest.display()
        )))
}

/// Write a new instance disk: template + parameters, padded to [`DISK_SIZE`].
pub fn write_disk(template: &Path, disk: &Path, params: &GuestParams) -> Result<(), DriverError> {
    let mut image =
        std::fs::read(template).map_err(DriverError::io(format!("read {}", template.display())))?;
    patch_params(&mut image, params).map_err(|e| {
        DriverError::InvalidConfig(format!("testvm template {}: {e}", template.display()))
    })?;
    let tmp = disk.with_extension("img.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&image)?;
        f.set_len(DISK_SIZE.max(image.len() as u64))?;
        f.sync_all()?;
        std::fs::rename(&tmp, disk)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DriverError::io(format!("write {}", disk.display()))(e)
    })
}

/// Rewrite the parameter block of an existing disk (config changes apply at
/// the next cold boot).
pub fn repatch_disk(disk: &Path, params: &GuestParams) -> Result<(), DriverError> {
    let ctx = || format!("update the test guest parameters in {}", disk.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(DriverError::io(ctx()))?;
    let mut head = vec![0u8; 1024];
    f.read_exact(&mut head).map_err(DriverError::io(ctx()))?;
    check_template(&head).map_err(|e| {
        DriverError::WrongState(format!("{}: not a testvm disk ({e})", disk.display()))
    })?;
    f.seek(SeekFrom::Start(PARAMS_OFFSET as u64))
        .map_err(DriverError::io(ctx()))?;
    f.write_all(&params.encode())
        .map_err(DriverError::io(ctx()))?;
    f.sync_all().map_err(DriverError::io(ctx()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_template() -> Vec<u8> {
        let mut img = vec![0u8; 2048];
        img[510] = 0x55;
        img[511] = 0xaa;
        let p = GuestParams {
            map_2m: 10,
            dirty_start_mib: 4,
            dirty_mib: 16,
            interval_ms: 100,
        }
        .encode();
        img[PARAMS_OFFSET..PARAMS_OFFSET + PARAMS_SIZE].copy_from_slice(&p);
        img
    }

    #[test]
    fn encode_layout() {
        let b = GuestParams {
            map_2m: 386,
            dirty_start_mib: 4,
            dirty_mib: 768,
            interval_ms: 100,
        }
        .encode();
        assert_eq!(&b[0..4], b"FPRM");
        assert_eq!(u16::from_le_bytes([b[4], b[5]]), 1);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 24);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 386);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 768);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 100);
    }

    #[test]
    fn patching() {
        let mut img = fake_template();
        let cfg = VmConfig {
            dirty_mib: 64,
            ..VmConfig::default()
        };
        let p = GuestParams::from_config(&cfg);
        patch_params(&mut img, &p).unwrap();
        assert_eq!(
            &img[PARAMS_OFFSET..PARAMS_OFFSET + PARAMS_SIZE],
            &p.encode()
        );
        assert_eq!(p.map_2m, 34);
        let mut bad = vec![0u8; 1024];
        assert!(patch_params(&mut bad, &p).is_err());
        img[PARAMS_OFFSET] ^= 1;
        assert!(patch_params(&mut img, &p).unwrap_err().contains("magic"));
    }

    #[test]
    fn source_layout_matches() {
        // The constants here must agree with testvm.asm.
        assert!(TESTVM_ASM.contains("COUNTER     equ 0x9000"));
        assert!(TESTVM_ASM.contains("times 0x1c0 - ($ - $$) db 0"));
        assert!(TESTVM_ASM.contains("dd 0x4d525046"));
    }

    #[tokio::test]
    async fn real_template_assembles() {
        if std::process::Command::new("nasm")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("skipped: nasm not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = ensure_template(dir.path()).await.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        check_template(&bytes).unwrap();
        let defaults = GuestParams::from_config(&VmConfig::default()).encode();
        assert_eq!(
            &bytes[PARAMS_OFFSET..PARAMS_OFFSET + PARAMS_SIZE],
            &defaults,
            "asm defaults differ from VmConfig"
        );
        // Cached: a second call reuses the file; no temporary left behind.
        assert_eq!(ensure_template(dir.path()).await.unwrap(), path);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn disk_files() {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("t.bin");
        std::fs::write(&tpl, fake_template()).unwrap();
        let disk = dir.path().join("disk.img");
        let p = GuestParams {
            map_2m: 3,
            dirty_start_mib: 2,
            dirty_mib: 4,
            interval_ms: 50,
        };
        write_disk(&tpl, &disk, &p).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), DISK_SIZE);
        let p2 = GuestParams {
            interval_ms: 200,
            ..p
        };
        repatch_disk(&disk, &p2).unwrap();
        let b = std::fs::read(&disk).unwrap();
        assert_eq!(&b[PARAMS_OFFSET..PARAMS_OFFSET + PARAMS_SIZE], &p2.encode());
    }
}
