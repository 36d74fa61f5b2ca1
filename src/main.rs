//! The `receipt-gateway` command line (docs/configuration.md#command-line). It makes no decisions:
//! it parses arguments, loads the configuration (exit 64 when invalid, before any port is bound),
//! sets up logging and calls into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use receipt_gateway::config::Config;
#[cfg(feature = "simulator")]
use receipt_gateway::simulator::{CallbackPlayer, SimApp, SimOptions, Simulator, demo};
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::{self, SecretKey};
use receipt_gateway::{Listeners, shutdown};
use tokio::net::TcpListener;

/// EX_USAGE from sysexits.h: the configuration or the command line is wrong.
const EXIT_CONFIG: u8 = 64;
const DEFAULT_CONFIG: &str = "config/receipt-gateway.toml";

#[derive(Parser)]
#[command(
    name = "receipt-gateway",
    version,
    about = "A caching, coalescing gateway for Tencent Cloud Chat read receipts"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file [default: $RECEIPT_GATEWAY_CONFIG, then config/receipt-gateway.toml]
    #[arg(long, global = true, env = "RECEIPT_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the data and admin APIs (the default).
    Serve,
    /// Validate the configuration and print each app's sdkappid, region and endpoint.
    CheckConfig,
    /// Print a UserSig signed with $TENCENT_IM_SECRET_KEY.
    Usersig {
        #[arg(long)]
        sdkappid: u64,
        #[arg(long)]
        identifier: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86400)]
        expire: u64,
    },
    /// Run the Tencent simulator; keys from $TENCENT_IM_SECRET_KEY.
    #[cfg(feature = "simulator")]
    Simulate(SimulateArgs),
    /// Simulator and gateway on loopback with a built-in config.
    #[cfg(feature = "simulator")]
    Demo,
}

#[cfg(feature = "simulator")]
#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// SDKAPPID:IDENTIFIER, once per app.
    #[arg(long = "app", required = true)]
    apps: Vec<String>,
    /// Calls allowed per rolling second per (sdkappid, API).
    #[arg(long, default_value_t = 200)]
    limit: u32,
    /// The most MsgSeqs one receipt call may carry.
    #[arg(long, default_value_t = 50)]
    max_seqs: usize,
    /// Make the group members read the messages asked about, and deliver each read here
    /// as a Group.CallbackAfterReadReceipt (signed with $TENCENT_IM_CALLBACK_TOKEN when set).
    #[arg(long)]
    callback_url: Option<String>,
    /// How many reads the members make per second (with --callback-url).
    #[arg(long, default_value_t = 10.0, requires = "callback_url")]
    reads_per_second: f64,
}

/// mimalloc rather than glibc's malloc: under load every core allocates and frees small
/// buffers (bodies, headers, answers), and glibc's arenas showed as lock waits and
/// `_int_free`/`malloc_consolidate` in the warm path's profile; mimalloc's per-thread
/// free lists avoid both (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // Only ring is compiled in; installing it up front keeps rustls from guessing.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config_path),
        Command::CheckConfig => check_config(config_path),
        Command::Usersig { sdkappid, identifier, expire } => print_usersig(sdkappid, &identifier, expire),
        #[cfg(feature = "simulator")]
        Command::Simulate(args) => simulate(args),
        #[cfg(feature = "simulator")]
        Command::Demo => runtime_then(|| async { demo::run().await.map_err(|e| e.to_string()) }),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Lines go straight to standard output's file, one write(2) each (a line is
    // formatted whole first): std's `Stdout` would put a process-wide lock around that
    // system call, and every worker logging a request would queue behind the others'.
    // Pipes take a write of up to 4 KiB at once, files keep whole writes apart.
    use std::os::fd::AsFd;
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => init_tracing_with(filter, std::sync::Arc::new(std::fs::File::from(fd))),
        Err(_) => init_tracing_with(filter, std::io::stdout),
    }
}

fn init_tracing_with<W>(filter: tracing_subscriber::EnvFilter, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    if std::env::var("RECEIPT_GATEWAY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        // The line tracing-subscriber's `json().flatten_event(true)` writes, at a
        // fraction of its cost (`logline`).
        builder.event_format(receipt_gateway::telemetry::logline::JsonLines).init();
    } else {
        builder.init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("invalid configuration {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn runtime_then<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime_then(|| async move {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        let data = bind(config.server.listen).await?;
        let admin = bind(config.server.admin_listen).await?;
        // The bound addresses, so that port 0 in the config is usable (tests, benchmarks).
        let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(listen = %local(&data), admin = %local(&admin), "serving");
        receipt_gateway::run_reloading(config, Some(path), Listeners { data, admin }, shutdown::signal())
            .await
            .map_err(|e| e.to_string())
    })
}

fn check_config(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!("{}: ok", path.display());
    for app in &config.apps {
        let region = app.region.map_or("-", |r| r.name());
        let backup = app.backup_endpoint.as_deref().unwrap_or("none");
        println!("sdkappid={} region={} endpoint={} backup_endpoint={backup}", app.id, region, app.endpoint);
    }
    let upstream = &config.upstream;
    let ca_file = upstream.ca_file.as_ref().map_or("none".into(), |p| p.display().to_string());
    println!("upstream proxy: {}", upstream.egress.describe());
    println!("upstream ca_file: {ca_file} ({} extra roots)", upstream.extra_roots.len());
    let redis_used = matches!(config.fleet, receipt_gateway::config::FleetBackend::Redis(_))
        || matches!(config.budget.backend, receipt_gateway::config::BudgetBackend::Redis { .. });
    if redis_used {
        // Passwords print as *** (in a URL) or not at all (redis.password_env).
        let r = &config.redis;
        let user = r.username.as_deref().unwrap_or("-");
        let password = if r.password.is_some() { "from the environment" } else { "-" };
        println!("redis={} username={user} password={password}", r.describe());
    }
    ExitCode::SUCCESS
}

fn secret_from_env() -> Result<SecretKey, ExitCode> {
    match std::env::var("TENCENT_IM_SECRET_KEY") {
        Ok(key) if !key.trim().is_empty() => Ok(SecretKey::new(key.trim())),
        _ => {
            eprintln!("TENCENT_IM_SECRET_KEY must hold the app's secret key");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn print_usersig(sdkappid: u64, identifier: &str, expire: u64) -> ExitCode {
    let key = match secret_from_env() {
        Ok(k) => k,
        Err(code) => return code,
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("{}", usersig::sign(AppId(sdkappid), &key, identifier, now, expire).expose());
    ExitCode::SUCCESS
}

#[cfg(feature = "simulator")]
fn simulate(args: SimulateArgs) -> ExitCode {
    let key = match secret_from_env() {
        Ok(k) => k,
        Err(code) => return code,
    };
    let mut sim_apps = Vec::new();
    for spec in &args.apps {
        let parsed = spec.split_once(':').and_then(|(id, ident)| Some((id.parse::<u64>().ok()?, ident)));
        match parsed {
            Some((id, ident)) if !ident.is_empty() => {
                sim_apps.push(SimApp { app: AppId(id), identifier: ident.to_owned(), key: key.clone() });
            }
            _ => {
                eprintln!("--app {spec:?}: expected SDKAPPID:IDENTIFIER");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let player = match args.callback_url.as_deref().map(|url| member_player(url, args.reads_per_second)) {
        None => None,
        Some(Ok(player)) => Some(player),
        Some(Err(code)) => return code,
    };
    let players = player.as_ref().map(|p| format!(", members reading {}/s into {}", p.reads_per_second(), p.url()));
    let (listen, limit, max_seqs) = (args.listen, args.limit, args.max_seqs);
    let options = SimOptions { limit_per_second: limit, max_seqs, player, ..SimOptions::new(sim_apps) };
    runtime_then(|| async move {
        let listener = TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        println!(
            "Tencent simulator on http://{addr} (limit {limit}/s per API, at most {max_seqs} MsgSeqs per call{})",
            players.unwrap_or_default()
        );
        Simulator::new(options).serve(listener, shutdown::signal()).await.map_err(|e| e.to_string())
    })
}

/// The member player of `simulate --callback-url`; its token from
/// $TENCENT_IM_CALLBACK_TOKEN (unsigned callbacks when it is unset or empty).
#[cfg(feature = "simulator")]
fn member_player(url: &str, reads_per_second: f64) -> Result<CallbackPlayer, ExitCode> {
    let player = CallbackPlayer::new(url, reads_per_second).map_err(|e| {
        eprintln!("--callback-url / --reads-per-second: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    Ok(match std::env::var("TENCENT_IM_CALLBACK_TOKEN") {
        Ok(token) if !token.trim().is_empty() => player.with_token(SecretKey::new(token.trim())),
        _ => player,
    })
}
