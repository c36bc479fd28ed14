//! The LL-HLS load: clients that poll like hls.js in low-latency mode, each on its own
//! keep-alive connections. Per part, a client asks for the playlist with a blocking reload for
//! the next part (as a delta update) and, at the same time, for the part its preload hint names,
//! which the server holds until the part is complete. What is measured:
//!
//! - the server's CPU over the window, per client;
//! - availability latency: from the moment the server completed a part (its `X-Onair-Ready-Us`)
//!   to the moment the client has all of its bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::source::{Clip, Feed};
use super::{Env, Pcts, cpu_seconds};
use crate::{BoxError, Server, unix_us};

const STREAM: &str = "hlsbench";

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HlsReport {
    pub clients: usize,
    pub window_s: f64,
    pub cpu_s: f64,
    /// Server CPU per client, % of one core.
    pub cpu_pct_per_client: f64,
    /// Parts clients received in the window, and the part rate per client.
    pub parts: u64,
    pub parts_per_client_s: f64,
    pub playlists: u64,
    pub bytes: u64,
    /// Part ready on the server → all of its bytes at the client.
    pub availability_ms: Pcts,
    /// Requests that failed (status or I/O), with the first few reasons.
    pub failed: u64,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct ClientStats {
    parts: u64,
    playlists: u64,
    bytes: u64,
    availability_us: Vec<u32>,
    failed: u64,
    error: Option<String>,
}

type Http = Client<HttpConnector, Empty<Bytes>>;

async fn fetch(client: &Http, url: &str) -> Result<(u16, Option<u64>, Bytes), BoxError> {
    let uri: hyper::Uri = url.parse()?;
    let res = client.get(uri).await?;
    let status = res.status().as_u16();
    let ready = res
        .headers()
        .get("x-onair-ready-us")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, ready, body))
}

/// The next part to wait for: (msn, part index) and the preload hint's URI.
fn next_part(playlist: &str) -> Option<(u64, usize, String)> {
    let mut msn = 0;
    let mut complete = 0;
    let mut open_parts = 0;
    let mut hint = None;
    for line in playlist.lines() {
        if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            msn = v.parse().ok()?;
        } else if let Some(v) = line.strip_prefix("#EXT-X-SKIP:SKIPPED-SEGMENTS=") {
            complete += v.parse::<u64>().ok()?;
        } else if line.starts_with("#EXTINF:") {
            complete += 1;
            open_parts = 0;
        } else if line.starts_with("#EXT-X-PART:") {
            open_parts += 1;
        } else if let Some(v) = line.strip_prefix("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"") {
            hint = v.split('"').next().map(str::to_string);
        }
    }
    Some((msn + complete, open_parts, hint?))
}

async fn client(
    base: String,
    stop: CancellationToken,
    recording: Arc<std::sync::atomic::AtomicBool>,
) -> ClientStats {
    let mut st = ClientStats::default();
    // Two connections, as a player keeps: one for the playlist, one for the part.
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2)
        .build_http();
    let playlist_url = format!("{base}/index.m3u8");
    // The first playlist, plain; then, per part, the blocking reload for the next part and the
    // part its preload hint names, both at once.
    let mut playlist = fetch(&http, &playlist_url).await;
    while !stop.is_cancelled() {
        let next = match &playlist {
            Ok((200, _, body)) => next_part(&String::from_utf8_lossy(body)),
            _ => None,
        };
        let Some((msn, part, hint)) = next else {
            st.failed += 1;
            let why = match &playlist {
                Ok((status, _, _)) => format!("playlist: HTTP {status} or no preload hint"),
                Err(e) => format!("playlist: {e}"),
            };
            st.error.get_or_insert(why);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => break,
            }
            playlist = fetch(&http, &playlist_url).await;
            continue;
        };
        let reload = format!("{playlist_url}?_HLS_msn={msn}&_HLS_part={part}&_HLS_skip=YES");
        let part_url = format!("{base}/{hint}");
        let both = async {
            let part = async {
                let r = fetch(&http, &part_url).await;
                (r, unix_us(std::time::SystemTime::now()))
            };
            tokio::join!(fetch(&http, &reload), part)
        };
        let (next_playlist, (got, at)) =
            tokio::select! { r = both => r, _ = stop.cancelled() => break };
        st.playlists += 1;
        playlist = next_playlist;
        match got {
            Ok((200, Some(ready), body)) => {
                if recording.load(std::sync::atomic::Ordering::Relaxed) {
                    st.parts += 1;
                    st.bytes += body.len() as u64;
                    st.availability_us
                        .push(u32::try_from(at.saturating_sub(ready)).unwrap_or(u32::MAX));
                }
            }
            Ok((status, _, _)) => {
                st.failed += 1;
                st.error.get_or_insert(format!("part: HTTP {status}"));
            }
            Err(e) => {
                st.failed += 1;
                st.error.get_or_insert(e.to_string());
            }
        }
    }
    st
}

/// One HLS run against onair: `clients` clients for `window`.
pub async fn run(
    env: &Env,
    clip: Arc<Clip>,
    clients: usize,
    window: Duration,
) -> Result<HlsReport, BoxError> {
    let config = super::fan_out_config()?;
    let mut server = Server::start_bin(
        &env.onair_bin,
        &["--config", &config],
        &[("ONAIR_LOG", "info")],
    )
    .await;
    let mut feed = Feed::start(clip, &server.rtmp_url(STREAM))?;
    server.wait_log("publishing", Duration::from_secs(20)).await;
    let base = format!("http://{}/hls/{STREAM}", server.http);
    // Wait for a complete segment, so every client starts inside a stable window.
    let (status, _) = crate::http_get(
        &server.http,
        &format!("/hls/{STREAM}/index.m3u8?_HLS_msn=1"),
    )
    .await?;
    if status != 200 {
        return Err(format!("no HLS from onair: HTTP {status}").into());
    }
    let stop = CancellationToken::new();
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(base.clone(), stop.clone(), recording.clone())))
        .collect();
    // Let every client get going, then measure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    feed.check().await?;
    let pid = server.pid();
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    recording.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(window).await;
    recording.store(false, std::sync::atomic::Ordering::Relaxed);
    let cpu_s = cpu_seconds(pid)? - cpu0;
    let window_s = t0.elapsed().as_secs_f64();
    feed.check().await?;
    stop.cancel();
    let mut r = HlsReport {
        clients,
        window_s,
        cpu_s,
        ..Default::default()
    };
    let mut availability = Vec::new();
    for t in tasks {
        let st = t.await?;
        r.parts += st.parts;
        r.playlists += st.playlists;
        r.bytes += st.bytes;
        r.failed += st.failed;
        if let Some(e) = st.error
            && r.errors.len() < 5
        {
            r.errors.push(e);
        }
        availability.extend_from_slice(&st.availability_us);
    }
    feed.stop().await;
    let _ = server.terminate().await;
    r.cpu_pct_per_client = 100.0 * cpu_s / window_s / clients.max(1) as f64;
    r.parts_per_client_s = r.parts as f64 / window_s / clients.max(1) as f64;
    r.availability_ms = Pcts::from_us(availability);
    Ok(r)
}
