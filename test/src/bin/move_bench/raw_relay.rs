//! The raw VM move's (variants (a), (a0)) streams between its two QEMUs and
//! their plain relay: no TLS, no websockets, no compression.

use ferry_drivers::vm::migrate::{MigrateParams, MigrationStream};

/// The raw move's streams and their plain relay: two socketpairs, or with
/// multifd QEMU A's connections to a socket we listen on, each joined to a
/// connection to QEMU B's socket.
pub(crate) fn streams(
    a: &ferry_drivers::InstanceSpec,
    b: &ferry_drivers::InstanceSpec,
    params: &MigrateParams,
) -> Result<
    (
        MigrationStream,
        MigrationStream,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ),
    String,
> {
    if params.multifd_channels > 0 {
        let (a_path, b_path) = (
            a.paths.run.join("raw-out.sock"),
            b.paths.run.join("raw-in.sock"),
        );
        let _ = std::fs::remove_file(&a_path);
        let listener =
            tokio::net::UnixListener::bind(&a_path).map_err(|err| format!("bind: {err}"))?;
        let to = b_path.clone();
        let channels = 1 + params.multifd_channels as usize;
        let relay = tokio::spawn(async move {
            let mut all = Vec::new();
            for _ in 0..channels {
                let (mut from_a, _) = listener.accept().await?;
                let mut to_b = tokio::net::UnixStream::connect(&to).await?;
                all.push(tokio::spawn(async move {
                    tokio::io::copy_bidirectional(&mut from_a, &mut to_b).await
                }));
            }
            for h in all {
                h.await.map_err(std::io::Error::other)??;
            }
            Ok(())
        });
        return Ok((
            MigrationStream::Unix(a_path),
            MigrationStream::Unix(b_path),
            relay,
        ));
    }
    let (a_qemu, a_relay) =
        std::os::unix::net::UnixStream::pair().map_err(|err| format!("socketpair: {err}"))?;
    let (b_qemu, b_relay) =
        std::os::unix::net::UnixStream::pair().map_err(|err| format!("socketpair: {err}"))?;
    a_relay
        .set_nonblocking(true)
        .map_err(|err| format!("nonblocking: {err}"))?;
    b_relay
        .set_nonblocking(true)
        .map_err(|err| format!("nonblocking: {err}"))?;
    let relay = tokio::spawn(async move {
        let mut ar = tokio::net::UnixStream::from_std(a_relay)?;
        let mut br = tokio::net::UnixStream::from_std(b_relay)?;
        tokio::io::copy_bidirectional(&mut ar, &mut br).await?;
        Ok(())
    });
    Ok((
        MigrationStream::Fd(a_qemu.into()),
        MigrationStream::Fd(b_qemu.into()),
        relay,
    ))
}
