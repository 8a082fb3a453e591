//! `exec` with `"wait-for-websocket": true`, as Incus clients use it: the
//! operation's metadata holds one secret per stream (`fds`: "0", "1", "2" and
//! "control", or "0" and "control" for an interactive command on a
//! terminal); the client dials `/1.0/operations/<id>/websocket?secret=…` for
//! each; once all are connected the command runs. Data travels as binary
//! frames; an empty text frame ends a stream (then a close frame). The
//! control stream carries `signal` and `window-resize` requests. The exit
//! status becomes the operation's `metadata.return`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use ferry_drivers::container::{exit_code, ContainerDriver, ExecChild, ExecStdio};
use ferry_drivers::InstanceSpec;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::core::{Daemon, ExecRequest};
use crate::ops::{Op, Outcome};

/// How long the client has to connect every stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// After the command exits, how long its output may still drain (a job it
/// left behind may hold the pipes open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type Sink = SplitSink<WebSocket, Message>;
type Source = SplitStream<WebSocket>;

impl Daemon {
    /// Start an exec whose stdio are websockets; returns its operation with
    /// `metadata.fds` set.
    pub fn exec_websockets(
        self: &Arc<Self>,
        name: &str,
        spec: InstanceSpec,
        driver: ContainerDriver,
        req: ExecRequest,
    ) -> Arc<Op> {
        let keys: &[&str] = if req.interactive {
            &["0", "control"]
        } else {
            &["0", "1", "2", "control"]
        };
        let secrets: Vec<String> = keys.iter().map(|_| crate::migrate::new_secret()).collect();
        let (setup_tx, setup_rx) = tokio::sync::oneshot::channel();
        let d = self.clone();
        let op = self.ops.spawn(
            "Executing command",
            json!({"instances": [format!("/1.0/instances/{name}")]}),
            false,
            move |op| async move {
                let Ok(receivers) = setup_rx.await else {
                    return Outcome::Failed("exec set-up was interrupted".into());
                };
                let connected =
                    tokio::time::timeout(CONNECT_TIMEOUT, futures::future::try_join_all(receivers))
                        .await;
                d.exec_pending.forget(&op.id);
                let socks = match connected {
                    Ok(Ok(s)) => s,
                    _ => {
                        return Outcome::Failed(format!(
                            "the client did not connect all exec websockets within {} s",
                            CONNECT_TIMEOUT.as_secs()
                        ))
                    }
                };
                match run(&driver, &spec, &req, socks).await {
                    Ok(code) => {
                        let mut m = Map::new();
                        m.insert("return".into(), json!(code));
                        Outcome::Done(m)
                    }
                    Err(e) => Outcome::Failed(format!("exec: {e}")),
                }
            },
        );
        let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let receivers = self.exec_pending.expect_all(&op.id, &refs);
        let fds: Map<String, Value> = keys
            .iter()
            .zip(&secrets)
            .map(|(k, s)| (k.to_string(), json!(s)))
            .collect();
        op.set_meta("fds", Value::Object(fds));
        let _ = setup_tx.send(receivers);
        op
    }
}

/// Run the command with its stdio on `socks` (in `fds` order); its exit code.
async fn run(
    driver: &ContainerDriver,
    spec: &InstanceSpec,
    req: &ExecRequest,
    socks: Vec<WebSocket>,
) -> Result<i32, String> {
    let mut socks = socks.into_iter();
    let mut next = || socks.next().expect("one websocket per fd").split();
    if req.interactive {
        let (s0, r0) = next();
        let (sc, rc) = next();
        run_tty(driver, spec, req, (s0, r0), (sc, rc)).await
    } else {
        let (s0, r0) = next();
        let (s1, _) = next();
        let (s2, _) = next();
        let (sc, rc) = next();
        run_pipes(driver, spec, req, (s0, r0), s1, s2, (sc, rc)).await
    }
}

async fn run_pipes(
    driver: &ContainerDriver,
    spec: &InstanceSpec,
    req: &ExecRequest,
    (mut s0, r0): (Sink, Source),
    s1: Sink,
    s2: Sink,
    (mut sc, rc): (Sink, Source),
) -> Result<i32, String> {
    let stdio = ExecStdio {
        stdin: Some(Stdio::piped()),
        stdout: Stdio::piped(),
        stderr: Stdio::piped(),
        tty: false,
    };
    let mut ec = driver
        .spawn_exec(spec, &req.command, &req.environment, stdio)
        .map_err(|e| e.to_string())?;
    let stdin = ec.child.stdin.take().expect("piped stdin");
    let stdout = ec.child.stdout.take().expect("piped stdout");
    let stderr = ec.child.stderr.take().expect("piped stderr");
    let input = tokio::spawn(pump_in(r0, stdin));
    let out = tokio::spawn(pump_out(stdout, s1));
    let err = tokio::spawn(pump_out(stderr, s2));
    let control = tokio::spawn(control(rc, ec.child.id(), None));
    let code = wait(&mut ec).await?;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    input.abort();
    control.abort();
    close(&mut s0).await;
    close(&mut sc).await;
    Ok(code)
}

async fn run_tty(
    driver: &ContainerDriver,
    spec: &InstanceSpec,
    req: &ExecRequest,
    (s0, r0): (Sink, Source),
    (mut sc, rc): (Sink, Source),
) -> Result<i32, String> {
    let pty = nix::pty::openpty(&winsize(req.width, req.height), None)
        .map_err(|e| format!("cannot open a terminal: {e}"))?;
    let slave = |fd: &OwnedFd| -> Result<Stdio, String> {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|e| format!("terminal: {e}"))
    };
    let stdio = ExecStdio {
        stdin: Some(slave(&pty.slave)?),
        stdout: slave(&pty.slave)?,
        stderr: slave(&pty.slave)?,
        tty: true,
    };
    let mut env = req.environment.clone();
    env.entry("TERM".into()).or_insert_with(|| "xterm".into());
    let mut ec = driver
        .spawn_exec(spec, &req.command, &env, stdio)
        .map_err(|e| e.to_string())?;
    drop(pty.slave);
    let master_fd = pty.master.as_raw_fd();
    let master = tokio::fs::File::from_std(std::fs::File::from(pty.master));
    let writer = master
        .try_clone()
        .await
        .map_err(|e| format!("terminal: {e}"))?;
    let input = tokio::spawn(pump_in(r0, writer));
    // The terminal's output (stdout and stderr) goes to fd 0's websocket.
    let out = tokio::spawn(pump_out(master, s0));
    let control = tokio::spawn(control(rc, ec.child.id(), Some(master_fd)));
    let code = wait(&mut ec).await?;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, out).await;
    input.abort();
    control.abort();
    close(&mut sc).await;
    Ok(code)
}

fn winsize(width: u16, height: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: if height == 0 { 24 } else { height },
        ws_col: if width == 0 { 80 } else { width },
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Client → command: binary frames are data; a text frame (the barrier),
/// a close frame or the end of the socket closes the command's stdin.
async fn pump_in(mut from: Source, mut to: impl AsyncWrite + Unpin) {
    while let Some(Ok(msg)) = from.next().await {
        match msg {
            Message::Binary(b) if to.write_all(&b).await.is_err() => break,
            Message::Text(_) | Message::Close(_) => break,
            _ => {}
        }
    }
    let _ = to.shutdown().await;
}

/// Command → client: binary frames, then the end-of-stream barrier (an empty
/// text frame) and a close frame.
async fn pump_out(mut from: impl AsyncRead + Unpin, mut to: Sink) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    end_stream(&mut to).await;
}

async fn end_stream(to: &mut Sink) {
    let _ = to.send(Message::Text(String::new().into())).await;
    close(to).await;
}

async fn close(to: &mut Sink) {
    let _ = to
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

/// The control stream: forwarded signals and terminal resizes.
async fn control(mut from: Source, nsenter: Option<u32>, tty: Option<i32>) {
    while let Some(Ok(msg)) = from.next().await {
        let Message::Text(t) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&t) else {
            continue;
        };
        match v["command"].as_str() {
            Some("signal") => {
                let sig = v["signal"].as_i64().unwrap_or(0) as i32;
                if let (Some(n), Ok(sig)) = (nsenter, nix::sys::signal::Signal::try_from(sig)) {
                    let pid = nix::unistd::Pid::from_raw(command_pid(n));
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
            Some("window-resize") => {
                let arg = |k: &str| -> u16 {
                    v["args"][k]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                };
                if let Some(fd) = tty {
                    let ws = winsize(arg("width"), arg("height"));
                    // SAFETY: TIOCSWINSZ on our own terminal fd with a valid struct.
                    unsafe {
                        libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The command's pid: nsenter's child (nsenter forks into the pid
/// namespace), looked up when a signal is to be sent; nsenter itself if it
/// has none (yet).
fn command_pid(nsenter: u32) -> i32 {
    std::fs::read_to_string(format!("/proc/{nsenter}/task/{nsenter}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(nsenter as i32)
}

async fn wait(ec: &mut ExecChild) -> Result<i32, String> {
    let status = ec
        .child
        .wait()
        .await
        .map_err(|e| format!("waiting for the command: {e}"))?;
    Ok(exit_code(status))
}
