//! REST API end to end against a real ferryd: bad input is refused with a
//! clear 4xx naming the problem and changes nothing; HTTPS needs a trusted
//! client certificate; operations end and can be listed and cancelled.

use ferry_client::{Client, Method};
use ferry_test::{need_root, raw_unix, Member};
use serde_json::json;

fn volumes(m: &Member) -> Vec<String> {
    let mut v = vec![];
    for kind in ["containers", "virtual-machines"] {
        for e in std::fs::read_dir(m.dir.join("storage-pools/default").join(kind))
            .into_iter()
            .flatten()
            .flatten()
        {
            v.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    v.sort();
    v
}

async fn instance_names(m: &Member) -> Vec<String> {
    let (code, v) = m.raw(Method::GET, "/1.0/instances", None).await;
    assert_eq!(code, 200);
    let mut names: Vec<String> = v["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

async fn expect_error(m: &Member, method: Method, path: &str, body: &str, code: u16, needle: &str) {
    let (got, v) = m.raw(method.clone(), path, Some(body.as_bytes())).await;
    assert_eq!(got, code, "{method} {path} {body}: {v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error_code"], code, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains(needle),
        "error {msg:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    if !need_root("bad_input_is_refused_and_changes_nothing") {
        return;
    }
    let m = Member::start("m1");
    let (code, info) = m.raw(Method::GET, "/1.0", None).await;
    assert_eq!(code, 200);
    assert_eq!(info["metadata"]["environment"]["server_name"], "m1");

    let create = "/1.0/instances";
    for bad in ["Bad_Name", "1abc", "a-", "../etc", ""] {
        let body = json!({"name": bad, "type": "container", "source": {"type": "image", "alias": "busybox"}}).to_string();
        expect_error(&m, Method::POST, create, &body, 400, "invalid").await;
    }
    let body = json!({"name": "c1", "source": {"type": "image", "alias": "ubuntu"}}).to_string();
    expect_error(&m, Method::POST, create, &body, 400, "busybox").await;
    let body = json!({"name": "v1", "type": "virtual-machine", "source": {"type": "image", "alias": "busybox"}}).to_string();
    expect_error(&m, Method::POST, create, &body, 400, "testvm").await;
    let body = json!({"name": "c1", "type": "zone"}).to_string();
    expect_error(&m, Method::POST, create, &body, 400, "virtual-machine").await;
    let body = json!({"name": "c1", "config": {"limits.memory": "lots"}}).to_string();
    expect_error(&m, Method::POST, create, &body, 400, "limits.memory").await;
    let body = json!({"name": "c1", "config": {"volatile.x": "1"}}).to_string();
    expect_error(&m, Method::POST, create, &body, 400, "volatile").await;
    expect_error(
        &m,
        Method::POST,
        create,
        "{\"name\": ",
        400,
        "Malformed JSON",
    )
    .await;
    expect_error(&m, Method::POST, create, "[1,2]", 400, "Malformed JSON").await;
    expect_error(&m, Method::GET, "/1.0/instances/nope", "", 404, "not found").await;
    expect_error(
        &m,
        Method::PUT,
        "/1.0/instances/nope/state",
        "{\"action\":\"start\"}",
        404,
        "not found",
    )
    .await;
    expect_error(
        &m,
        Method::GET,
        "/1.0/operations/0000",
        "",
        404,
        "not found",
    )
    .await;
    expect_error(&m, Method::GET, "/1.0/nothing-here", "", 404, "not found").await;
    assert!(instance_names(&m).await.is_empty());
    assert!(volumes(&m).is_empty(), "{:?}", volumes(&m));

    // The CLI says the same, on stderr, exit 1.
    let out = m.ferry(&["launch", "busybox", "Bad_Name"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Error: Instance name \"Bad_Name\" is invalid"),
        "{out:?}"
    );

    // Now with a real running container.
    m.launch("c1", "container", "busybox", json!({})).await;
    let before = m.instance("c1").await;
    assert_eq!(before["status"], "Running");
    let body = json!({"name": "c1", "source": {"type": "image", "alias": "busybox"}}).to_string();
    expect_error(&m, Method::POST, create, &body, 409, "already exists").await;
    expect_error(
        &m,
        Method::PUT,
        "/1.0/instances/c1/state",
        "{\"action\":\"start\"}",
        400,
        "already running",
    )
    .await;
    expect_error(
        &m,
        Method::PUT,
        "/1.0/instances/c1/state",
        "{\"action\":\"jump\"}",
        400,
        "Unknown action",
    )
    .await;
    expect_error(
        &m,
        Method::PUT,
        "/1.0/instances/c1/state",
        "{\"action\":",
        400,
        "Malformed JSON",
    )
    .await;
    expect_error(
        &m,
        Method::DELETE,
        "/1.0/instances/c1",
        "",
        400,
        "ferry delete --force c1",
    )
    .await;
    expect_error(
        &m,
        Method::POST,
        "/1.0/instances/c1/exec",
        "{\"command\":[]}",
        400,
        "empty",
    )
    .await;
    let after = m.instance("c1").await;
    assert_eq!(after["status"], "Running");
    assert_eq!(
        after["state"]["pid"], before["state"]["pid"],
        "the container was restarted"
    );
    assert_eq!(after["created_at"], before["created_at"]);
    assert_eq!(instance_names(&m).await, vec!["c1"]);
    let out = m.ferry(&["delete", "c1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
    assert_eq!(m.instance("c1").await["status"], "Running");

    // Finished operations stay listed with their outcome; none is left running.
    let ops = m.client.operations().await.unwrap();
    assert!(
        ops.iter()
            .any(|o| o.description == "Creating instance" && o.status == "Success"),
        "{ops:?}"
    );
    assert!(
        ops.iter().all(|o| o.status_code >= 200),
        "an operation is stuck: {ops:?}"
    );
    let done = &ops[0].id;
    let (code, v) = m
        .raw(Method::DELETE, &format!("/1.0/operations/{done}"), None)
        .await;
    assert_eq!(code, 400);
    assert!(
        v["error"].as_str().unwrap().contains("already finished"),
        "{v}"
    );

    m.ferry_ok(&["delete", "--force", "c1"]);
    assert!(instance_names(&m).await.is_empty());
    assert!(volumes(&m).is_empty(), "{:?}", volumes(&m));
}

#[tokio::test]
async fn https_needs_a_trusted_client_certificate() {
    if !need_root("https_needs_a_trusted_client_certificate") {
        return;
    }
    let m = Member::start("m1");
    let tmp = tempfile::tempdir().unwrap();
    let (crt, key) = (tmp.path().join("client.crt"), tmp.path().join("client.key"));
    ferry_client::tls::ensure_client_cert(&crt, &key).unwrap();
    let url = format!("https://{}", m.https);
    let server_crt = m.dir.join("server.crt");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server_crt.exists() {
        assert!(std::time::Instant::now() < deadline, "no server.crt");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let client = Client::https(&url, &crt, &key, &server_crt).unwrap();
    let err = client
        .get("/1.0")
        .await
        .expect_err("an untrusted client certificate must be refused");
    eprintln!("untrusted client refused: {err}");

    // Trust it, as `ferry config trust add` will: a file in DIR/trust.
    let fp = ferry_client::tls::pem_file_fingerprint(&crt).unwrap();
    std::fs::copy(&crt, m.dir.join("trust").join(format!("{fp}.crt"))).unwrap();
    let env = client.get("/1.0").await.expect("trusted client");
    assert_eq!(env.metadata["environment"]["server_name"], "m1");

    // A client pinning another server certificate refuses the server.
    let other = tmp.path().join("other.crt");
    let (ocrt, okey) = (other.clone(), tmp.path().join("other.key"));
    ferry_client::tls::ensure_client_cert(&ocrt, &okey).unwrap();
    let wrong_pin = Client::https(&url, &crt, &key, &other).unwrap();
    assert!(wrong_pin.get("/1.0").await.is_err());

    // The unix socket is root-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m.dir.join("unix.socket"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (code, _) = raw_unix(&m.dir.join("unix.socket"), "GET", "/1.0", None).await;
    assert_eq!(code, 200);
}
