use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use onair_server::config::Config;
use onair_server::delivery::framing::WsFramer;
use onair_server::delivery::http::{self, App};
use onair_server::hls::Hls;
use onair_server::hls::segmenter::Settings;
use onair_server::hub::{Hub, Limits, Tasks};
use onair_server::ingest::rtmp;
use onair_server::metrics::HubMetrics;
use onair_server::stats::Stats;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn main() -> ExitCode {
    let cfg = match Config::load() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("onair: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(cfg.log_filter()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("onair: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onair: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))
}

async fn run(cfg: Config) -> Result<(), String> {
    // First: metric handles made before the recorder exists would record nothing.
    let prometheus = onair_server::metrics::install()?;
    // A stock box starts processes at 1024 open files, which would cap viewers near a thousand:
    // take the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            tracing::info!(limit = n, "open files: raised to the hard limit");
            onair_server::metrics::open_files_limit(n);
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let rtmp_listener = bind("RTMP", cfg.rtmp).await?;
    let http_listener = bind("HTTP", cfg.http).await?;
    let srt_socket = onair_server::ingest::srt::bind(cfg.srt).await?;
    // Before the ready line, which tests and scripts wait for.
    for key in &cfg.secrets_on_command_line {
        tracing::warn!(
            "{key} was given on the command line, where anyone on this machine can read it \
             (ps): set ONAIR_{} or put it in the config file instead",
            key.to_uppercase()
        );
    }
    let reachable = |a: std::net::SocketAddr| !a.ip().is_loopback();
    if cfg.auth.publish_is_open()
        && (reachable(cfg.rtmp)
            || reachable(cfg.http)
            || cfg.listen.iter().any(|l| reachable(l.addr)))
    {
        tracing::warn!(
            "anyone who can reach this server can publish to any stream name: set a \
             publish_key or jwt_secret (README, \"Security\")"
        );
    }

    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    // Tests and scripts read the bound addresses from this line (ports may be 0 in config).
    let srt = srt_socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        "onair ready rtmp={} http={} srt={srt}",
        local(&rtmp_listener),
        local(&http_listener)
    );
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let hub = Hub::new(
        Limits {
            max_backlog_bytes: cfg.max_backlog_bytes,
            max_lag: cfg.max_lag,
        },
        Arc::new(WsFramer),
        Arc::new(HubMetrics),
        Tasks {
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        },
    );
    let stats = Stats::new(hub.clone(), cfg.clone());
    tracker.spawn(stats.clone().run(shutdown.clone()));
    let hls = Hls::new(
        Settings {
            part_target_ms: cfg.hls_part_ms,
            segment_target_ms: cfg.hls_segment_ms,
            window: cfg.hls_segments as usize,
        },
        cfg.hls_grace,
        hub.clone(),
        shutdown.clone(),
        tracker.clone(),
    );
    let pulls = Arc::new(onair_server::ingest::pull::Pulls::default());
    let transcoders = onair_server::transcode::start(
        hub.clone(),
        cfg.clone(),
        pulls.clone(),
        Tasks {
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        },
    );
    let limits =
        onair_server::limits::Limits::new(cfg.max_connections, cfg.max_handshakes_per_address);
    let app = App {
        limits: limits.clone(),
        hls_held: onair_server::limits::Counted::new(
            "hls_held",
            onair_server::delivery::hls::MAX_HLS_HELD,
        ),
        feed_subscribers: onair_server::limits::Counted::new(
            "feed_subscribers",
            onair_server::delivery::http::MAX_FEED_SUBSCRIBERS,
        ),
        transcoders,
        pulls: pulls.clone(),
        pushes: Default::default(),
        abr_memory: Default::default(),
        hub: hub.clone(),
        cfg: cfg.clone(),
        stats,
        hls,
        prometheus,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };
    tracker.spawn(rtmp::serve(
        rtmp_listener,
        hub.clone(),
        cfg.clone(),
        limits.clone(),
        shutdown.clone(),
        tracker.clone(),
    ));
    tracker.spawn(http::serve(http_listener, app));
    onair_server::ingest::srt::start(
        srt_socket,
        hub.clone(),
        cfg.clone(),
        limits.clone(),
        shutdown.clone(),
        tracker.clone(),
    )?;
    onair_server::ingest::pull::start(&pulls, &hub, &cfg, &shutdown, &tracker)?;
    onair_server::ingest::tcp::start(
        hub.clone(),
        cfg.clone(),
        limits,
        shutdown.clone(),
        tracker.clone(),
    )
    .await?;

    wait_for_signal().await;
    tracing::info!("shutting down: closing viewers and publishers");
    hub.begin_shutdown();
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 5 s");
    }
    tracing::info!("bye");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
