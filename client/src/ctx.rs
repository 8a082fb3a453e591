//! What every command needs: the client, the output format, and a helper
//! to run an operation behind a spinner.

use anyhow::{bail, Result};
use ferry_client::{config, tls, Client, Method, Operation};
use serde_json::Value;

use crate::cli::{Cli, Format};
use crate::output::{pretty_json, print_out};
use crate::progress::Spinner;

pub struct Ctx {
    pub client: Client,
    pub format: Format,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }

    /// Print an envelope's metadata as pretty JSON.
    pub fn print_json(&self, metadata: &Value) {
        print_out(&pretty_json(metadata));
    }

    /// Run an async request behind a spinner and wait for its operation;
    /// Failure and Cancelled are errors (`ClientError::OperationFailed`).
    pub async fn run_op(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Operation> {
        let op = self.run_op_to_end(method, path, body, what).await?;
        Ok(op.into_result()?)
    }

    /// Like [`Ctx::run_op`], but the operation is returned however it ended,
    /// so a failed one's metadata can still be shown; the caller checks
    /// `op.is_success()` (or `op.into_result()`).
    pub async fn run_op_to_end(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Operation> {
        let spinner = Spinner::new(what);
        let op = self
            .client
            .run_async_to_end(method, path, body, |op| spinner.update(op))
            .await;
        drop(spinner);
        Ok(op?)
    }
}

/// Build the client from the global flags.
pub fn connect(cli: &Cli) -> Result<Client> {
    let Some(remote) = &cli.remote else {
        return Ok(Client::unix(config::socket_path(cli.dir.clone())));
    };
    let Some(server_cert) = &cli.server_cert else {
        bail!("--remote needs --server-cert FILE: a copy of the server's certificate (DIR/server.crt on the server)");
    };
    let (default_cert, default_key) = match (&cli.cert, &cli.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => config::default_client_cert_paths()?,
    };
    let cert = cli.cert.clone().unwrap_or(default_cert);
    let key = cli.key.clone().unwrap_or(default_key);
    if let Some(fp) = tls::ensure_client_cert(&cert, &key)? {
        eprintln!(
            "Generated a client certificate: {} (key {})",
            cert.display(),
            key.display()
        );
        eprintln!("Its SHA-256 fingerprint is {fp}");
        eprintln!(
            "To trust it, copy {} to the server as DIR/trust/{fp}.crt",
            cert.display()
        );
    }
    Ok(Client::https(remote, &cert, &key, server_cert)?)
}
