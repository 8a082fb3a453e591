//! Default locations.

use std::path::PathBuf;

use crate::error::{ClientError, Result};

/// Default daemon directory.
pub const DEFAULT_DIR: &str = "/var/lib/ferry";

/// The daemon directory: `dir`, else `$FERRY_DIR`, else [`DEFAULT_DIR`].
pub fn daemon_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.or_else(|| {
        std::env::var_os("FERRY_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// `DIR/unix.socket`.
pub fn socket_path(dir: Option<PathBuf>) -> PathBuf {
    daemon_dir(dir).join("unix.socket")
}

/// `~/.config/ferry` (honouring `$XDG_CONFIG_HOME`).
pub fn config_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("ferry"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ClientError::Config("HOME is not set: pass --cert and --key".into()))?;
    Ok(PathBuf::from(home).join(".config").join("ferry"))
}

/// `~/.config/ferry/client.crt` and `client.key`.
pub fn default_client_cert_paths() -> Result<(PathBuf, PathBuf)> {
    let d = config_dir()?;
    Ok((d.join("client.crt"), d.join("client.key")))
}
