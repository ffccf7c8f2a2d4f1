//! `quicmesh-node`: run the daemon, or ask a running one for its status.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use quicmesh_node::config::NodeConfig;

#[derive(Parser)]
#[command(name = "quicmesh-node", version, about = "quicmesh node daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node with a config file.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file and exit (64 on error).
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running node's status (peers, flows, snapshot, certificate, counters).
    Status {
        /// The node's config file (its data_dir holds the admin socket).
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The admin socket path (default: <data_dir>/admin.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print raw JSON.
        #[arg(long)]
        json: bool,
        /// Print Prometheus metrics instead.
        #[arg(long)]
        metrics: bool,
    },
}

fn load(path: &std::path::Path) -> Result<NodeConfig, ExitCode> {
    NodeConfig::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(64)
    })
}

/// Raises the soft limit on open files to the hard one (as Go programs do): a node holds a
/// socket per flow on both sides of a proxy, and a port-dependent NAT attempt opens 256
/// spare sockets at once; 1,024, a common default soft limit, runs out under load.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open files limit raised"),
            Err(e) => tracing::warn!(error = %e, soft, "could not raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open files limit"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUICMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Cmd::Run { .. } = &cli.cmd {
        raise_fd_limit();
    }
    // `run` sizes the runtime from its config (`worker_threads`); other commands need one.
    let threads = match &cli.cmd {
        Cmd::Run { config } => match load(config) {
            Ok(c) => c.worker_threads,
            Err(code) => return code,
        },
        _ => Some(1),
    };
    // Automatic: half the cores, at least one. The kernel's side of the data path (TUN,
    // UDP, segmentation) and the applications need the rest, and every cross-thread
    // wake-up on the packet path costs tens of microseconds on small VMs: measured on 2
    // vCPUs, one runtime thread moved 15-20% more overlay traffic per CPU second than two.
    let threads = threads.or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some((cores / 2).max(1))
    });
    let built = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.cmd {
        Cmd::Check { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(c) => c,
        },
        Cmd::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(c) => return c,
            };
            rt.block_on(async move {
                let node = match quicmesh_node::run::start(cfg).await {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(e.exit_code() as u8);
                    }
                };
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("error: signal handler: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
                // Spans of the last second go out before the node does.
                node.telemetry.flush().await;
                node.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
                let _ = std::fs::remove_file(node.data.admin_socket());
                ExitCode::SUCCESS
            })
        }
        Cmd::Status {
            config,
            socket,
            json,
            metrics,
        } => {
            let path = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => match load(&c) {
                    Ok(cfg) => cfg.data_dir.join("admin.sock"),
                    Err(code) => return code,
                },
                (None, None) => {
                    eprintln!("error: give --config or --socket");
                    return ExitCode::from(64);
                }
            };
            let cmd = if metrics { "metrics" } else { "status" };
            match rt.block_on(quicmesh_node::admin::query(&path, cmd)) {
                Ok(out) if json || metrics => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Ok(out) => match serde_json::from_str::<serde_json::Value>(&out) {
                    Ok(v) => {
                        print!("{}", quicmesh_node::admin::render_status(&v));
                        ExitCode::SUCCESS
                    }
                    Err(_) => {
                        println!("{out}");
                        ExitCode::SUCCESS
                    }
                },
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
