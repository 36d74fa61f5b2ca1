//! The command line (docs/configuration.md#command-line): `check-config`, exit status 64,
//! `usersig`.

use std::process::Command;

use receipt_gateway::tencent::domain::{AppId, Region};
use receipt_gateway::tencent::usersig::{self, SecretKey};

fn gateway() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_receipt-gateway"));
    command.env_remove("RECEIPT_GATEWAY_CONFIG").env("RUST_LOG", "off");
    command
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("receipt-gateway-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_resolves_all_seven_regions() {
    let mut text = String::new();
    for (i, region) in Region::ALL.iter().enumerate() {
        text.push_str(&format!(
            "[[apps]]\nsdkappid = {}\nregion = \"{}\"\nidentifier = \"admin\"\n",
            1_400_000_000 + i,
            region.name()
        ));
    }
    let path = write_config("regions.toml", &text);

    let out = gateway()
        .args(["check-config", "--config"])
        .arg(&path)
        .env("TENCENT_IM_SECRET_KEY", "never-print-me")
        .output()
        .unwrap();

    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (i, region) in Region::ALL.iter().enumerate() {
        let line = format!(
            "sdkappid={} region={} endpoint=https://{} backup_endpoint=https://{}",
            1_400_000_000 + i,
            region.name(),
            region.domain(),
            region.backup_domain()
        );
        assert!(stdout.contains(&line), "missing {line:?} in\n{stdout}");
    }
    assert!(!stdout.contains("never-print-me"), "the secret is never printed");
}

#[test]
fn an_invalid_configuration_exits_64_naming_the_key_before_binding() {
    // Port 1 on loopback is never bindable by the tests, so reaching bind would fail
    // differently; exit 64 with the key's name proves validation came first.
    let path = write_config(
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\n[cache]\nttl_ms = 0\n[[apps]]\nsdkappid = 1\nregion = \"tokyo\"\nidentifier = \"a\"\n",
    );

    let serve = gateway().args(["serve", "--config"]).arg(&path).env("TENCENT_IM_SECRET_KEY", "k").output().unwrap();
    let check = gateway()
        .arg("check-config")
        .env("RECEIPT_GATEWAY_CONFIG", &path)
        .env("TENCENT_IM_SECRET_KEY", "k")
        .output()
        .unwrap();
    let no_secret = write_config("nosecret.toml", "[[apps]]\nsdkappid = 1\nregion = \"tokyo\"\nidentifier = \"a\"\n");
    let missing = gateway()
        .arg("check-config")
        .arg("--config")
        .arg(&no_secret)
        .env_remove("TENCENT_IM_SECRET_KEY")
        .output()
        .unwrap();

    for out in [&serve, &check] {
        assert_eq!(out.status.code(), Some(64));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cache.ttl_ms"), "{out:?}");
    }
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("TENCENT_IM_SECRET_KEY"));
}

#[test]
fn usersig_prints_a_signature_that_verifies() {
    let out = gateway()
        .args(["usersig", "--sdkappid", "1400000000", "--identifier", "administrator", "--expire", "600"])
        .env("TENCENT_IM_SECRET_KEY", "cli-test-key")
        .output()
        .unwrap();

    assert!(out.status.success());
    let sig = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let doc = usersig::decode(&sig).unwrap();
    let now = doc.time + 1;
    assert!(usersig::verify(&sig, AppId(1_400_000_000), "administrator", &SecretKey::new("cli-test-key"), now).is_ok());
    assert_eq!(doc.expire, 600);
}

/// Kills the demo however the test ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_demo_serves_and_its_printed_curl_returns_receipts() {
    use std::io::BufRead;
    let _light = crate::support::light().await;

    let mut child = gateway().arg("demo").stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.contains("-d '")) {
        printed.push(rx.recv_timeout(crate::support::WAIT).expect("the demo prints its curl"));
    }
    // Take the URL and body from the printed curl, as a user pasting it would.
    let text = printed.join("\n");
    let url = text.split('\'').find(|s| s.starts_with("http://")).unwrap().to_owned();
    let body = text.rsplit("-d '").next().unwrap().trim_end_matches('\'').to_owned();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();

    let request = http::Request::post(&url).body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap();
    let response = crate::support::within(client.request(request)).await.unwrap();
    let status = response.status();
    let bytes =
        crate::support::within(http_body_util::BodyExt::collect(response.into_body())).await.unwrap().to_bytes();

    assert_eq!(status, http::StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(answer["ActionStatus"], "OK");
    assert_eq!(answer["GroupMsgReceiptList"].as_array().map(Vec::len), Some(3));
}
