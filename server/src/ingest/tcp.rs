//! Sources over plain TCP: cameras the server connects to (`[[pull]]`, e.g. `raspivid … -l -o
//! tcp://0.0.0.0:1025`), and ports sources push to (`[[listen]]`, one stream name per address).
//!
//! Either way the bytes are raw H.264 (Annex B) or an FLV bytestream (`ffmpeg -f flv
//! tcp://…`), told apart by their first bytes: an FLV stream starts with `FLV`, an Annex B one
//! with a start code. A pulled camera that drops is reconnected with backoff; its viewers stay
//! and resume from its next IDR.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use onair_protocol::flv::{StreamError, TagReader};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::MediaIngest;
use super::raw::{RawError, RawH264};
use crate::config::{Config, ListenSource, PullSource};
use crate::hub::{Hub, PublisherInfo, now_us};

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("{0}")]
    Raw(#[from] RawError),
    #[error("FLV: {0}")]
    Flv(#[from] StreamError),
    #[error("{0}")]
    Ingest(#[from] super::IngestError),
    #[error("stream {0:?} is already being published")]
    Busy(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("nothing received for {} s", .0.as_secs())]
    Idle(Duration),
    #[error("removed by the server's operator")]
    Removed,
}

impl TcpError {
    fn kind(&self) -> &'static str {
        match self {
            TcpError::Raw(e) => e.kind(),
            TcpError::Flv(_) => "bad_flv",
            TcpError::Ingest(_) => "media",
            TcpError::Busy(_) => "refused",
            TcpError::Io(_) => "io",
            TcpError::Idle(_) => "timeout",
            TcpError::Removed => "removed",
        }
    }
}

/// What reads one connection's bytes.
enum Reader {
    Raw(Box<RawH264>),
    Flv(Box<(MediaIngest, TagReader)>),
}

/// Serves one source connection as stream `name` until it ends; `slot` (a listener's
/// connection) leaves its handshake once the stream is claimed.
#[allow(clippy::too_many_arguments)]
async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    name: &str,
    fps: Option<f64>,
    hub: &Arc<Hub>,
    cfg: &Config,
    slot: Option<&crate::limits::Slot>,
    shutdown: &CancellationToken,
) -> Result<(), TcpError> {
    let _ = tcp.set_nodelay(true);
    // The first bytes say what it is (3 are enough); a camera may take a moment to send them.
    let mut first = vec![0u8; 64 << 10];
    let mut n = 0;
    while n < 3 {
        let got = tokio::select! {
            r = tokio::time::timeout(cfg.rtmp_idle_timeout, tcp.read(&mut first[n..])) => match r {
                Ok(r) => r?,
                Err(_) => return Err(TcpError::Idle(cfg.rtmp_idle_timeout)),
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        if got == 0 {
            return Ok(());
        }
        n += got;
    }
    let info = PublisherInfo {
        protocol: "tcp",
        peer,
        since_ms: now_us() / 1000,
        clock: None,
    };
    let publisher = hub
        .publish(name, info)
        .map_err(|_| TcpError::Busy(name.to_string()))?;
    if let Some(slot) = slot {
        slot.handshake_done();
    }
    let ingest = MediaIngest::new(publisher);
    let mut reader = if first.starts_with(b"FLV") {
        tracing::info!("publishing (FLV)");
        Reader::Flv(Box::new((ingest, TagReader::default())))
    } else {
        tracing::info!("publishing (raw H.264)");
        Reader::Raw(Box::new(RawH264::new(ingest, fps, cfg.ingest_idr_timeout)))
    };
    let mut chunk = &first[..n];
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match &mut reader {
            Reader::Raw(raw) => raw.push(chunk)?,
            Reader::Flv(flv) => {
                let (ingest, flv) = &mut **flv;
                flv.push(chunk);
                while let Some(tag) = flv.next_tag()? {
                    match tag.kind {
                        8 => ingest.flv_audio(&tag.body, tag.timestamp)?,
                        9 => ingest.flv_video(&tag.body, tag.timestamp)?,
                        _ => {} // script data
                    }
                }
            }
        }
        let removed = async {
            match &reader {
                Reader::Raw(raw) => raw.removed().await,
                Reader::Flv(flv) => flv.0.removed().await,
            }
        };
        // The no-IDR rule holds even for a source that sends nothing; the idle timeout runs
        // from the last bytes received.
        let idr_deadline = match &reader {
            Reader::Raw(raw) => raw.idr_deadline(),
            Reader::Flv(_) => None,
        };
        let n = tokio::select! {
            r = tokio::time::timeout(cfg.rtmp_idle_timeout, tcp.read(&mut buf)) => match r {
                Ok(r) => r?,
                Err(_) => return Err(TcpError::Idle(cfg.rtmp_idle_timeout)),
            },
            _ = tokio::time::sleep_until(idr_deadline.unwrap_or_else(tokio::time::Instant::now)),
                if idr_deadline.is_some() => {
                return Err(TcpError::Raw(RawError::NoIdr(cfg.ingest_idr_timeout)));
            }
            _ = removed => return Err(TcpError::Removed),
            _ = shutdown.cancelled() => return Ok(()),
        };
        if n == 0 {
            if let Reader::Raw(raw) = &mut reader {
                raw.finish()?;
            }
            return Ok(());
        }
        chunk = &buf[..n];
    }
}

/// Starts the configured pulls and listeners.
pub async fn start(
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    limits: Arc<crate::limits::Limits>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), String> {
    for l in &cfg.listen {
        let listener = TcpListener::bind(l.addr)
            .await
            .map_err(|e| format!("cannot listen for {} on {}: {e}", l.name, l.addr))?;
        tracing::info!(stream = %l.name, addr = %listener.local_addr().map_err(|e| e.to_string())?, "tcp ingest listening");
        tracker.spawn(listen(
            listener,
            l.clone(),
            hub.clone(),
            cfg.clone(),
            limits.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    for p in &cfg.pull {
        tracker.spawn(pull(p.clone(), hub.clone(), cfg.clone(), shutdown.clone()));
    }
    Ok(())
}

async fn listen(
    listener: TcpListener,
    source: ListenSource,
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    limits: Arc<crate::limits::Limits>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            c = crate::net::accept(&listener, "tcp ingest") => c,
            _ = shutdown.cancelled() => return,
        };
        if let Some(allow) = &source.allow
            && !crate::auth::address_allowed(allow, peer.ip())
        {
            // Closed at once, before a byte is read: nothing for it to learn or hold.
            crate::metrics::auth_refusal("publish", "tcp", crate::auth::Refusal::Address.label());
            tracing::warn!(stream = %source.name, %peer, "tcp source refused: address not allowed");
            continue;
        }
        let Some(slot) = limits.admit(peer, "tcp") else {
            continue;
        };
        let (hub, cfg, shutdown, source) =
            (hub.clone(), cfg.clone(), shutdown.clone(), source.clone());
        let span = tracing::info_span!("ingest", protocol = "tcp", stream = %source.name, %peer);
        tracker.spawn(
            async move {
                let slot = Some(&slot);
                match serve(
                    tcp,
                    peer,
                    &source.name,
                    source.fps,
                    &hub,
                    &cfg,
                    slot,
                    &shutdown,
                )
                .await
                {
                    Ok(()) => tracing::info!("source finished"),
                    Err(e) => {
                        crate::metrics::ingest_error("tcp", e.kind());
                        tracing::warn!(error = %e, "tcp source refused or failed");
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Keeps a camera connected: reconnects with backoff (0.5 s doubling to 10 s; back to 0.5 s
/// after a connection that lasted).
async fn pull(source: PullSource, hub: Arc<Hub>, cfg: Arc<Config>, shutdown: CancellationToken) {
    let Some(addr) = source.tcp_addr().map(str::to_string) else {
        return;
    };
    let span = tracing::info_span!("pull", stream = %source.name, %addr);
    async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr));
            let started = std::time::Instant::now();
            let result = tokio::select! {
                c = connect => match c {
                    Ok(Ok(tcp)) => {
                        let peer = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                        tracing::info!("camera connected");
                        serve(tcp, peer, &source.name, source.fps, &hub, &cfg, None, &shutdown).await
                    }
                    Ok(Err(e)) => Err(TcpError::Io(e)),
                    Err(_) => Err(TcpError::Io(std::io::ErrorKind::TimedOut.into())),
                },
                _ = shutdown.cancelled() => return,
            };
            if shutdown.is_cancelled() {
                return;
            }
            match &result {
                Ok(()) => tracing::info!("camera disconnected; reconnecting"),
                Err(e) => {
                    crate::metrics::ingest_error("tcp", e.kind());
                    tracing::warn!(error = %e, "camera failed; reconnecting");
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(500);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    .instrument(span)
    .await
}
