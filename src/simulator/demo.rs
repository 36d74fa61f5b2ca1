//! `receipt-gateway demo`: the simulator and the gateway on loopback with the built-in
//! `config/demo.toml`, and a `curl` to paste. The simulator plays the groups' members:
//! they read the messages asked about at [`READS_PER_SECOND`], and each read reaches the
//! gateway as a signed Tencent callback, so the counts move without upstream calls.
//! Runs until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, SecretSource};
use crate::tencent::usersig::SecretKey;
use crate::tencent::webhook::CALLBACK_PATH;
use crate::{Listeners, RunError};

use super::{CallbackPlayer, SimApp, SimOptions, Simulator};

/// The demo's configuration, compiled in so the demo needs no files.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");
/// A key known to both demo halves (the app's secret key and its callback token); it
/// protects nothing.
const DEMO_KEY: &str = "receipt-gateway-demo-key-not-a-secret";
/// How fast the simulated members read.
pub const READS_PER_SECOND: f64 = 2.0;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the simulated members: {0:?}")]
    Player(super::PlayerError),
}

/// Supplies the demo key for whatever variable the demo config names.
struct DemoSecrets;

impl SecretSource for DemoSecrets {
    /// The demo key for every secret; no egress proxy (`HTTPS_PROXY`, ...): the demo's
    /// upstream is the simulator beside it.
    fn env(&self, name: &str) -> Option<String> {
        (!name.to_ascii_uppercase().ends_with("_PROXY")).then(|| DEMO_KEY.into())
    }

    fn file(&self, _: &Path) -> std::io::Result<String> {
        Ok(DEMO_KEY.into())
    }
}

/// Binds `addr`, or a free port on the same host if it is taken.
async fn bind_or_any(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(_) => TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await,
    }
}

pub async fn run() -> Result<(), DemoError> {
    let mut config = Config::parse(DEMO_CONFIG, &DemoSecrets)?;
    let data = bind_or_any(config.server.listen).await?;
    let admin = bind_or_any(config.server.admin_listen).await?;
    let (data_addr, admin_addr) = (data.local_addr()?, admin.local_addr()?);
    let sim_listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let sim_addr = sim_listener.local_addr()?;
    let apps = config
        .apps
        .iter()
        .map(|a| SimApp { app: a.id, identifier: a.identifier.clone(), key: SecretKey::new(DEMO_KEY) })
        .collect();
    let members = CallbackPlayer::new(&format!("http://{data_addr}{CALLBACK_PATH}"), READS_PER_SECOND)
        .map_err(DemoError::Player)?
        .with_token(SecretKey::new(DEMO_KEY));
    let simulator = Simulator::new(SimOptions { player: Some(members), ..SimOptions::new(apps) });
    let sim = tokio::spawn(simulator.clone().serve(sim_listener, crate::shutdown::signal()));
    for app in &mut config.apps {
        app.endpoint = format!("http://{sim_addr}");
        app.backup_endpoint = None;
    }
    let app = config.apps.first().map(|a| a.id.0).unwrap_or_default();
    println!(
        "receipt-gateway demo: gateway on http://{data_addr}, admin on http://{admin_addr}, \
         Tencent simulator on http://{sim_addr}\n\n\
         Query read receipts (twice: the second answer comes from the cache, X-Cache: HIT):\n\n  \
         curl -si -X POST 'http://{data_addr}/v4/group_open_http_svc/get_group_msg_receipt?sdkappid={app}' \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"GroupId\":\"@TGS#demo\",\"MsgSeqList\":[{{\"MsgSeq\":1}},{{\"MsgSeq\":2}},{{\"MsgSeq\":2000000}}]}}'\n\n\
         The groups' members read what was asked about, {READS_PER_SECOND} reads a second, and each read reaches\n\
         the gateway as Tencent's signed callback: ask again, and ReadNum grows with X-Cache: HIT and no\n\
         upstream call (receipt_gateway_callbacks_total and receipt_gateway_upstream_calls_total).\n\n\
         Who has read MsgSeq 1 (the detail API, its own budget):\n\n  \
         curl -s -X POST 'http://{data_addr}/v4/group_open_http_svc/get_group_msg_receipt_detail?sdkappid={app}' \\\n    \
         -d '{{\"GroupId\":\"@TGS#demo\",\"MsgSeq\":1,\"Filter\":0,\"Cursor\":\"\",\"Count\":10}}'\n\n\
         Metrics:  curl -s http://{admin_addr}/metrics | grep receipt_gateway_\n\
         Groups named missing* or invalid* answer 10010 / 10015; MsgSeq above 1000000 has no receipt (10062).\n\
         Ctrl-C stops the demo.\n"
    );
    crate::run(config, Listeners { data, admin }, crate::shutdown::signal()).await?;
    let _ = sim.await;
    println!(
        "simulator served {} receipt and {} detail calls; {} reads delivered as callbacks",
        simulator.call_count(),
        simulator.detail_call_count(),
        simulator.callbacks_delivered()
    );
    Ok(())
}
