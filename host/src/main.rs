//! The `wasmlb` binary: `wasmlb --config wasmlb.toml [--check]`, and
//! `wasmlb plugin new NAME` for plugin authors.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use wasmlb::config::Config;
use wasmlb::plugin::Runtime;
use wasmlb::proxy::Proxy;
use wasmlb::server::Server;

/// A load balancer whose backend selection is a WebAssembly plugin.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The config file (TOML). Required unless a subcommand is given.
    #[arg(short, long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Load and validate the config and every plugin (including its init),
    /// print `ok` and exit 0; or print what is wrong and exit 1.
    #[arg(long)]
    check: bool,
    /// Log filter when RUST_LOG is unset: error, warn, info, debug, trace, or
    /// a tracing directive like `wasmlb=debug`.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Worker threads serving requests (default: one per CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Tools for strategy plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, clap::Subcommand)]
enum PluginCommand {
    /// Write a ready-to-build strategy crate NAME (Cargo.toml, a documented
    /// src/lib.rs, native tests) into DIR/NAME.
    New {
        /// Crate name: lowercase letters, digits and '-'.
        name: String,
        /// Directory to create the crate in.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Path of the wasmlb SDK (`sdk/` of a wasmlb checkout); default: the
        /// checkout this binary was built from, else the registry version.
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmlb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(Command::Plugin(PluginCommand::New { name, dir, sdk })) = &cli.command {
        let sdk = match sdk {
            Some(path) => wasmlb::scaffold::SdkSource::Path(
                std::path::absolute(path).context("resolving --sdk")?,
            ),
            None => wasmlb::scaffold::SdkSource::default_for_this_build(),
        };
        let created = wasmlb::scaffold::new_plugin(name, dir, &sdk)?;
        println!("created {}", created.display());
        println!("  cd {} && cargo test", created.display());
        println!("  cargo build --release --target wasm32-wasip2");
        return Ok(());
    }
    let path = cli.config.as_ref().context("--config FILE is required")?;
    let config = Config::load(path)?;
    if cli.check {
        let runtime = Runtime::new()?;
        Proxy::new(&config, &runtime)?;
        println!("ok");
        return Ok(());
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        builder.worker_threads(n.max(1));
    }
    let rt = builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(&config))
}

async fn serve(config: &Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Install every handler before announcing readiness: a signal that
    // arrives earlier would otherwise take its default action (SIGHUP kills).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let server = Server::start(config).await?;
    let control = server.control().clone();
    let reloader = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            // reload() logs its own outcome.
            let _ = control.reload().await;
        }
    });
    for (i, addr) in server.local_addrs().iter().enumerate() {
        let upstream = &config.listeners[i].upstream;
        println!("wasmlb listening on http://{addr} (listener[{i}], default upstream {upstream})");
    }
    if let Some(addr) = server.admin_addr() {
        println!("wasmlb admin API on http://{addr}");
    }
    tracing::info!(config = %config.path.display(), "started");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    reloader.abort();
    tracing::info!("shutting down: no new connections, waiting for in-flight requests");
    if server.shutdown().await {
        tracing::info!("all connections finished");
    } else {
        tracing::warn!("shutdown timeout reached with connections still open");
    }
    Ok(())
}
