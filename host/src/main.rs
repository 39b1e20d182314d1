//! The `wasmlb` binary: `wasmlb --config wasmlb.toml [--check]`, and
//! `wasmlb plugin new NAME` for plugin authors, `wasmlb simulate`, and
//! `wasmlb fleet publish|promote|rollback|status` for a fleet on etcd.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use wasmlb::config::Config;
use wasmlb::plugin::Runtime;
use wasmlb::proxy::Proxy;
use wasmlb::server::Server;

/// The process's allocator: jemalloc, set up in `.cargo/config.toml` to give
/// memory freed for about 1 s back to the OS (a background thread purges it).
/// glibc's malloc kept the 8 KiB buffers of a burst of short requests as
/// holes between the small allocations of connections that stayed open:
/// 4.8 KiB resident per idle keep-alive connection in `bench/run.py`'s idle
/// measurement, 2.4 KiB with jemalloc, at the same CPU per request (BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// wasmtime, cranelift and their parsers stay at `warn` unless named
    /// (`debug,wasmtime=debug`); `wasmlb=debug` is the usual way to debug.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Log line format on stderr: `text` (human-readable) or `json` (one
    /// object per line: timestamp, level, target, fields).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads serving requests (default: one per CPU).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Tools for strategy plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run a strategy plugin offline against synthetic or recorded traffic
    /// (simulated latency and failures per backend) and print the spread,
    /// fairness and hot spots.
    Simulate(SimulateArgs),
    /// A fleet of wasmlb instances sharing plugins through etcd: publish a
    /// plugin to an upstream (optionally as a canary), promote, roll back,
    /// and show every instance's status.
    #[command(subcommand)]
    Fleet(FleetCommand),
}

/// Where the fleet lives (every `fleet` subcommand).
#[derive(Debug, clap::Args)]
struct FleetAt {
    /// etcd endpoints, comma-separated `http://host:port`.
    #[arg(long, value_name = "URLS", value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// The fleet's key prefix (`[fleet] prefix`).
    #[arg(long, value_name = "PREFIX", default_value = "/wasmlb/")]
    prefix: String,
}

#[derive(Debug, clap::Subcommand)]
enum FleetCommand {
    /// Store a plugin in etcd and assign it to an upstream on every
    /// instance (or, with --canary N, on N instances first).
    Publish {
        #[command(flatten)]
        at: FleetAt,
        /// The upstream (by name, on every instance).
        #[arg(long)]
        upstream: String,
        /// The plugin: a wasm32-wasip2 component file.
        plugin: PathBuf,
        /// The plugin's config, a JSON object (default: each instance's
        /// configured plugin_config).
        #[arg(long, value_name = "JSON")]
        config: Option<String>,
        /// Run it on this many instances only, until `fleet promote`.
        #[arg(long, value_name = "N")]
        canary: Option<usize>,
    },
    /// Extend an upstream's canary to every instance.
    Promote {
        #[command(flatten)]
        at: FleetAt,
        /// The upstream.
        #[arg(long)]
        upstream: String,
        /// Promote even though a canary instance rolled the plugin back.
        #[arg(long)]
        force: bool,
    },
    /// Restore what an upstream ran before its current assignment, on every
    /// instance.
    Rollback {
        #[command(flatten)]
        at: FleetAt,
        /// The upstream.
        #[arg(long)]
        upstream: String,
    },
    /// Print every assignment and every instance with its digests and
    /// plugin health.
    Status {
        #[command(flatten)]
        at: FleetAt,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `wasmlb simulate` options. Per-backend lists are comma-separated, one
/// value per backend; a single value applies to every backend.
#[derive(Debug, clap::Args)]
struct SimulateArgs {
    /// A built-in strategy's name or a .wasm component file.
    #[arg(long, value_name = "FILE_OR_NAME")]
    plugin: String,
    /// Number of backends.
    #[arg(long, value_name = "N", default_value_t = 4)]
    backends: usize,
    /// The backends' addresses, comma-separated `IP:port` (sets their
    /// number): give a recorded upstream's to replay its trace against the
    /// same set, and see the recorded share beside the simulated one.
    #[arg(long, value_name = "LIST")]
    addresses: Option<String>,
    /// The plugin's plugin_config, as a JSON object.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    plugin_config: String,
    /// Backend weights, e.g. `1,1,2`.
    #[arg(long, value_name = "LIST", default_value = "1")]
    weights: String,
    /// One label per backend as key=value, e.g. `group=stable,group=canary`.
    #[arg(long, value_name = "LIST")]
    labels: Option<String>,
    /// Mean response latency per backend, in ms, e.g. `5,5,50`.
    #[arg(long, value_name = "LIST", default_value = "5")]
    latency_ms: String,
    /// Failure probability per backend (0 to 1), e.g. `0,0,0.2`.
    #[arg(long, value_name = "LIST", default_value = "0")]
    fail: String,
    /// Recorded traffic: JSON lines with at_ms, method, path, client, headers.
    /// Without it, synthetic traffic is generated.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Synthetic traffic: number of requests.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    requests: u64,
    /// Synthetic traffic: arrivals per second.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    rate: u64,
    /// Synthetic traffic: distinct client addresses (each also sends `x-user: user-<n>`).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    clients: u32,
    /// Synthetic traffic: a header added to every request, `name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Seed for simulated latencies and failures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
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
        /// checkout this binary was built from, if it is still there.
        #[arg(long, value_name = "PATH", conflicts_with = "sdk_git")]
        sdk: Option<PathBuf>,
        /// A git repository holding wasmlb, to take `wasmlb-sdk` from
        /// (cargo fetches it), in place of a local checkout.
        #[arg(long, value_name = "URL")]
        sdk_git: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    let filter = tracing_subscriber::EnvFilter::new(wasmlb::logging::filter(&directives));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmlb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(Command::Plugin(PluginCommand::New {
        name,
        dir,
        sdk,
        sdk_git,
    })) = &cli.command
    {
        let sdk = match (sdk, sdk_git) {
            (Some(path), _) => {
                let path = std::path::absolute(path).context("resolving --sdk")?;
                anyhow::ensure!(
                    path.join("Cargo.toml").is_file(),
                    "--sdk {}: no Cargo.toml there (give the sdk/ directory of a wasmlb checkout)",
                    path.display()
                );
                wasmlb::scaffold::SdkSource::Path(path)
            }
            (None, Some(url)) => wasmlb::scaffold::SdkSource::Git(url.clone()),
            (None, None) => wasmlb::scaffold::SdkSource::default_for_this_build().context(
                "cannot find the wasmlb SDK: this binary's checkout is gone and wasmlb-sdk \
                 is not on crates.io; pass --sdk PATH (the sdk/ directory of a wasmlb \
                 checkout) or --sdk-git URL (a git repository holding wasmlb)",
            )?,
        };
        let created = wasmlb::scaffold::new_plugin(name, dir, &sdk)?;
        println!("created {}", created.display());
        println!("  cd {} && cargo test", created.display());
        println!("  cargo build --release --target wasm32-wasip2");
        return Ok(());
    }
    if let Some(Command::Simulate(args)) = &cli.command {
        return simulate(args);
    }
    if let Some(Command::Fleet(command)) = &cli.command {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        return rt.block_on(fleet(command));
    }
    let path = cli.config.as_ref().context("--config FILE is required")?;
    let config = Config::load(path)?;
    if cli.check {
        let runtime = wasmlb::server::runtime_for(&config)?;
        Proxy::new(&config, &runtime)?;
        // As `nginx -t`: an address that cannot be bound now (in use, not
        // local, a privileged port) would fail the start.
        // Each listener (by index), then the admin address (`None`).
        let addresses = config.listeners.iter().enumerate();
        let addresses = addresses.map(|(i, l)| (l.address, Some(i)));
        let addresses = addresses.chain(config.admin.iter().map(|a| (a.address, None)));
        for (address, listener) in addresses {
            if address.port() != 0
                && let Err(e) = std::net::TcpListener::bind(address)
            {
                let at = match listener {
                    Some(i) => config.locate_nth("listener", i, "address"),
                    None => config.locate("admin", "address"),
                };
                anyhow::bail!("{at}: cannot listen on {address}: {e}");
            }
        }
        for warning in &config.warnings {
            println!("warning: {warning}");
        }
        println!("ok");
        return Ok(());
    }
    // As NGINX's `worker_rlimit_nofile`: use every descriptor the hard
    // limit allows; `max_connections` is derived from the result.
    match wasmlb::fd_limit::raise_nofile() {
        (n, None) => tracing::debug!(nofile = n, "RLIMIT_NOFILE raised to the hard limit"),
        (n, Some(e)) => tracing::warn!(nofile = n, "cannot raise RLIMIT_NOFILE: {e}"),
    }
    // One worker: tokio's single-threaded scheduler, which skips the
    // work-stealing machinery (as NGINX's single worker, and hyper's floor in
    // bench/run.py); more: the work-stealing one.
    let mut builder = match cli.threads.map(|n| n.max(1)) {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
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
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let server = Server::start(config).await?;
    let control = server.control().clone();
    // SIGUSR1: reopen the access log by its path (log rotation, as NGINX).
    let reopener = tokio::spawn({
        let control = control.clone();
        async move {
            while usr1.recv().await.is_some() {
                if let Some(log) = control.proxy().access_log() {
                    log.reopen();
                    tracing::info!("SIGUSR1: access log reopened");
                }
            }
        }
    });
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
        println!("wasmlb admin API listening on http://{addr}");
    }
    tracing::info!(config = %config.path.display(), "started");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    reloader.abort();
    reopener.abort();
    tracing::info!("shutting down: no new connections, waiting for in-flight requests");
    if server.shutdown().await {
        tracing::info!("all connections finished");
    } else {
        tracing::warn!("shutdown timeout reached with connections still open");
    }
    Ok(())
}

async fn fleet(command: &FleetCommand) -> anyhow::Result<()> {
    use wasmlb::fleet;
    let describe = |a: &fleet::Assignment| {
        let on = match &a.canary {
            Some(names) => format!("canary on {}", names.join(", ")),
            None => "every instance".to_string(),
        };
        format!("{} ({on})", a.target.digest)
    };
    match command {
        FleetCommand::Publish {
            at,
            upstream,
            plugin,
            config,
            canary,
        } => {
            let config = config
                .as_deref()
                .map(serde_json::from_str::<serde_json::Value>)
                .transpose()
                .context("--config: not JSON")?;
            let a = fleet::publish(&at.endpoints, &at.prefix, upstream, plugin, config, *canary)
                .await?;
            println!(
                "published {} to upstream {upstream}: {}",
                plugin.display(),
                describe(&a)
            );
        }
        FleetCommand::Promote {
            at,
            upstream,
            force,
        } => {
            let a = fleet::promote(&at.endpoints, &at.prefix, upstream, *force).await?;
            println!("promoted upstream {upstream}: {}", describe(&a));
        }
        FleetCommand::Rollback { at, upstream } => {
            match fleet::rollback(&at.endpoints, &at.prefix, upstream).await? {
                Some(a) => println!("rolled back upstream {upstream}: {}", describe(&a)),
                None => println!(
                    "rolled back upstream {upstream}: no assignment left, every instance runs its configured plugin"
                ),
            }
        }
        FleetCommand::Status { at, json } => {
            let status = fleet::status(&at.endpoints, &at.prefix).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", fleet::ops::render(&status));
            }
        }
    }
    Ok(())
}

/// `values` (comma-separated) as one value per backend: exactly `n`, or one
/// for all. Errors name `flag`.
fn per_backend<T: std::str::FromStr + Clone>(
    flag: &str,
    values: &str,
    n: usize,
) -> anyhow::Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    let parsed = values
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("--{flag}: {v:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<T>>>()?;
    match parsed.len() {
        1 => Ok(vec![parsed[0].clone(); n]),
        len if len == n => Ok(parsed),
        len => anyhow::bail!("--{flag}: {len} values for {n} backends (give 1 or {n})"),
    }
}

fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    use wasmlb::simulate::{SimBackend, Synthetic};
    let addresses: Option<Vec<std::net::SocketAddr>> = args
        .addresses
        .as_deref()
        .map(|list| {
            list.split(',')
                .map(|a| {
                    a.trim()
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--addresses: {a:?} is not IP:port"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .transpose()?;
    let n = addresses.as_ref().map_or(args.backends, Vec::len);
    anyhow::ensure!(n >= 1, "--backends: at least 1");
    let plugin = wasmlb::config::PluginRef::resolve(&args.plugin, std::path::Path::new("."))
        .map_err(|e| anyhow::anyhow!("--plugin: {e}"))?;
    let plugin_config: serde_json::Value = serde_json::from_str(&args.plugin_config)
        .map_err(|e| anyhow::anyhow!("--plugin-config: {e}"))?;
    anyhow::ensure!(
        plugin_config.is_object(),
        "--plugin-config: not a JSON object"
    );
    let weights: Vec<u32> = per_backend("weights", &args.weights, n)?;
    let latency: Vec<f64> = per_backend("latency-ms", &args.latency_ms, n)?;
    let fail: Vec<f64> = per_backend("fail", &args.fail, n)?;
    let labels: Vec<String> = match &args.labels {
        Some(l) => per_backend("labels", l, n)?,
        None => vec![String::new(); n],
    };
    let mut backends = Vec::with_capacity(n);
    for i in 0..n {
        anyhow::ensure!(
            (0.0..=1.0).contains(&fail[i]),
            "--fail: {} is not a probability",
            fail[i]
        );
        let mut b = SimBackend {
            weight: weights[i].max(1),
            latency_ms: latency[i],
            failure_rate: fail[i],
            address: addresses.as_ref().map(|a| a[i]),
            ..SimBackend::default()
        };
        if !labels[i].is_empty() {
            let (k, v) = labels[i]
                .split_once('=')
                .with_context(|| format!("--labels: {:?} is not key=value", labels[i]))?;
            b.labels.insert(k.to_string(), v.to_string());
        }
        backends.push(b);
    }
    let requests = match &args.trace {
        Some(path) => wasmlb::simulate::read_trace(path)?,
        None => {
            let mut headers = std::collections::BTreeMap::new();
            for h in &args.headers {
                let (k, v) = h
                    .split_once(':')
                    .with_context(|| format!("--header: {h:?} is not `name: value`"))?;
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            Synthetic {
                requests: args.requests,
                rate: args.rate,
                clients: args.clients,
                headers,
            }
            .requests()
        }
    };
    let runtime = Runtime::new()?;
    let config = wasmlb::simulate::upstream_config(plugin, plugin_config, &backends);
    let report = wasmlb::simulate::run(&runtime, &config, &backends, &requests, args.seed)?;
    print!("{}", report.render());
    Ok(())
}
