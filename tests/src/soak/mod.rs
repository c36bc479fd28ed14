//! `make soak`: the fault and soak runs of docs/reliability.md, against the release binary
//! with the benchmark's paced ffmpeg publisher and its viewers.
//!
//! - R1 ([`r1`]): viewers of which some stop reading: the others' delivery latency against a
//!   run without them, RSS during and after, and what the server did with the stalled ones.
//! - R3 ([`republish`]): the publisher cut off mid-frame and republished, also at another
//!   resolution: viewers stay, resume at the new publish's first keyframe, and ffmpeg decodes
//!   what they got.
//! - R4 ([`attack`]): garbage, oversize headers, slowloris, idle sockets and held HLS requests
//!   while a stream plays; `make test` runs a short version (`tests/tests/faults.rs`).
//! - R6 ([`r6`]): a long run at many viewers: RSS slope, frames lost, descriptors.
//!
//! R5 (every way in and out with and without credentials) is `tests/tests/auth.rs`, which
//! `make test` runs and `make soak` runs again against the release binary.

pub mod attack;
pub mod republish;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::load::source::{Clip, Feed};
use crate::load::viewers::{self, Proto, Shared, ViewerStats};
use crate::load::{Pcts, STREAM, rss_bytes};
use crate::{BoxError, Server};

/// A server with a stream playing: onair (no ladder) and the paced publisher.
pub struct Live {
    pub server: Server,
    pub feed: Feed,
}

impl Live {
    /// Starts `bin` with `config` (TOML text; the ladder is off unless it says otherwise) and
    /// `extra` arguments, publishes `clip`, and waits for a viewer's first frame.
    pub async fn start(
        bin: &Path,
        config: &str,
        extra: &[&str],
        clip: Arc<Clip>,
    ) -> Result<Live, BoxError> {
        let path = Self::config_path(config)?;
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(extra);
        let server = Server::start_bin(bin, &args, &[("ONAIR_LOG", "info")]).await;
        let feed = Feed::start(clip, &server.rtmp_url(STREAM))?;
        let mut live = Live { server, feed };
        let probe = Group::join(&live.server.http, "", 1, 1, 0).await;
        live.feed.check().await?;
        probe?.finish().await;
        Ok(live)
    }

    /// Writes `config` (TOML text) with the ladder turned off into a file; its path.
    pub fn config_path(config: &str) -> Result<String, BoxError> {
        crate::load::write_config(
            &format!("soak-{}.toml", unique()),
            &format!("{config}\n[streams.\"*\"]\nladder = []\n"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Viewers the server's API counts on the stream now (`GET /api/streams`).
    pub async fn api_viewers(&self) -> Result<u64, BoxError> {
        let (status, body) = crate::http_get(&self.server.http, "/api/streams").await?;
        if status != 200 {
            return Err(format!("GET /api/streams: {status} {body}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v.as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == STREAM)
            .and_then(|s| s["viewers"].as_u64())
            .ok_or_else(|| format!("no stream {STREAM:?} with a viewer count in {body}").into())
    }

    pub async fn stop(mut self) {
        self.feed.stop().await;
        let _ = self.server.terminate().await;
    }
}

fn unique() -> usize {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Viewers of the stream, as the benchmark runs them: each reads every frame and records
/// latency and losses while recording is on.
pub struct Group {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<ViewerStats>>,
}

impl Group {
    /// Starts `n` viewers of `/ws/bench{query}` at `per_sec`, each keeping room for
    /// `capacity` latency samples, and waits until every one has its first frame.
    pub async fn join(
        http: &str,
        query: &str,
        n: usize,
        per_sec: usize,
        capacity: usize,
    ) -> Result<Group, BoxError> {
        let shared = Arc::new(Shared {
            proto: Proto::Onair,
            addr: http.to_string(),
            paths: vec![format!("/ws/{STREAM}{query}")],
            recording: Default::default(),
            stop: CancellationToken::new(),
            started: AtomicUsize::new(0),
            progress: Notify::new(),
        });
        let gap = Duration::from_secs_f64(1.0 / per_sec.max(1) as f64);
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            tokio::time::sleep_until(start + gap * i as u32).await;
            tasks.push(tokio::spawn(viewers::run(shared.clone(), i, capacity)));
        }
        let started = crate::load::wait_started(&shared, n, Duration::from_secs(30)).await;
        let group = Group { shared, tasks };
        if started < n {
            let errors: Vec<String> = group
                .finish()
                .await
                .into_iter()
                .filter_map(|s| s.error)
                .take(3)
                .collect();
            return Err(format!("{started} of {n} viewers started: {errors:?}").into());
        }
        Ok(group)
    }

    pub fn record(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Stops every viewer and returns what each saw.
    pub async fn finish(self) -> Vec<ViewerStats> {
        self.shared.stop.cancel();
        let mut out = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            out.push(t.await.unwrap_or_else(|e| {
                let mut st = ViewerStats::default();
                st.error = Some(format!("viewer task: {e}"));
                st
            }));
        }
        out
    }
}

/// What a group of viewers saw, together.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Seen {
    pub viewers: usize,
    /// Viewers that ended with an error (the server closed them, or worse), and the first few.
    pub failed: usize,
    pub errors: Vec<String>,
    /// Frames missing from what viewers received while recording (gaps in the stamps), in
    /// total and at most for one viewer; skips to a keyframe the server announced.
    pub lost_total: u64,
    pub lost_max: u64,
    pub skips: u64,
    /// Video frames each viewer received while recording, fewest.
    pub frames_min: u64,
    pub delivery_ms: Pcts,
}

impl Seen {
    pub fn of(stats: Vec<ViewerStats>) -> Seen {
        let mut seen = Seen {
            viewers: stats.len(),
            frames_min: stats.iter().map(|s| s.video_frames).min().unwrap_or(0),
            ..Default::default()
        };
        let mut delivery = Vec::new();
        for s in stats {
            if let Some(e) = s.error {
                seen.failed += 1;
                if seen.errors.len() < 3 {
                    seen.errors.push(e);
                }
            }
            seen.lost_total += s.lost;
            seen.lost_max = seen.lost_max.max(s.lost);
            seen.skips += s.skips;
            delivery.extend_from_slice(&s.delivery_us);
        }
        seen.delivery_ms = Pcts::from_us(delivery);
        seen
    }
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> Result<usize, BoxError> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Samples a process's RSS every `every` until cancelled; the samples, in seconds from the
/// start and bytes.
pub fn sample_rss(
    pid: u32,
    every: Duration,
    stop: CancellationToken,
) -> JoinHandle<Vec<(f64, u64)>> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(every);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return out,
                _ = tick.tick() => {}
            }
            match rss_bytes(pid) {
                Ok(rss) => out.push((t0.elapsed().as_secs_f64(), rss)),
                Err(_) => return out,
            }
        }
    })
}

/// Least-squares slope of `(seconds, bytes)` samples, in KiB per minute.
pub fn slope_kib_per_min(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let sxy: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
    let sxx: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    sxy / sxx * 60.0 / 1024.0
}

/// Latency samples kept per viewer for a window of `secs` at the clip's 30 fps.
fn capacity(secs: f64) -> usize {
    (secs * 33.0) as usize + 64
}

/// R1: stalled viewers among readers.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct R1 {
    pub readers: usize,
    pub stalled: usize,
    /// The readers alone, then the readers with the stalled viewers beside them.
    pub alone: Seen,
    pub beside_stalled: Seen,
    pub window_s: f64,
    pub rss_alone: u64,
    pub rss_stalled_max: u64,
    /// After the server dropped the stalled viewers.
    pub rss_after: u64,
    /// Seconds from the stalled viewers' last read to the server dropping the first and the
    /// last of them (from its API's viewer count), if it did within the run.
    pub dropped_first_s: Option<f64>,
    pub dropped_all_s: Option<f64>,
    /// Stalled viewers that found their connection closed by the server when they read again.
    pub stalled_closed: usize,
}

/// A viewer that reads until its first video frame and then stops reading, until `resume`;
/// then reads what is left and says whether the server had closed the connection.
async fn stalled_viewer(
    http: String,
    stopped: Arc<(AtomicUsize, Notify)>,
    resume: CancellationToken,
) -> Result<bool, String> {
    use fastwebsockets::{OpCode, WebSocketError};
    use onair_protocol::wire::Message;
    let mut ws = viewers::connect(&http, &format!("/ws/{STREAM}"), None).await?;
    loop {
        let frame = ws.read_frame().await.map_err(|e| e.to_string())?;
        if frame.opcode == OpCode::Binary
            && matches!(Message::decode(&frame.payload), Ok(Message::Media { header, .. }) if header.track == 0)
        {
            break;
        }
    }
    stopped.0.fetch_add(1, Ordering::Relaxed);
    stopped.1.notify_waiters();
    resume.cancelled().await;
    // What the kernel still holds comes first; then the server's close, or more frames.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.read_frame()).await {
            Err(_) => return Ok(false),
            Ok(Err(WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF)) => {
                return Ok(true);
            }
            Ok(Err(_)) => return Ok(true),
            Ok(Ok(f)) if f.opcode == OpCode::Close => return Ok(true),
            Ok(Ok(_)) => {}
        }
    }
}

/// Runs R1: `readers` viewers alone for `window`, then again beside `stalled` viewers that
/// stop reading after their first frame, for `window` or until the server has dropped every
/// stalled viewer, whichever is longer (at most `max_wait`).
pub async fn r1(
    bin: &Path,
    clip: Arc<Clip>,
    readers: usize,
    stalled: usize,
    window: Duration,
    max_wait: Duration,
) -> Result<R1, BoxError> {
    let live = Live::start(bin, "", &[], clip).await?;
    let http = live.server.http.clone();
    let pid = live.pid();
    let mut r = R1 {
        readers,
        stalled,
        window_s: window.as_secs_f64(),
        ..Default::default()
    };

    let alone = Group::join(&http, "", readers, 250, capacity(window.as_secs_f64())).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    alone.record(true);
    tokio::time::sleep(window).await;
    alone.record(false);
    r.rss_alone = rss_bytes(pid)?;
    r.alone = Seen::of(alone.finish().await);

    // The stalled viewers first, so that their sockets are as old as any reader's.
    let stopped = Arc::new((AtomicUsize::new(0), Notify::new()));
    let resume = CancellationToken::new();
    let stalls: Vec<_> = (0..stalled)
        .map(|_| {
            tokio::spawn(stalled_viewer(
                http.clone(),
                stopped.clone(),
                resume.clone(),
            ))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stopped.0.load(Ordering::Relaxed) < stalled {
        let notified = stopped.1.notified();
        if stopped.0.load(Ordering::Relaxed) >= stalled {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(format!(
                "{} of {stalled} stalled viewers got a first frame",
                stopped.0.load(Ordering::Relaxed)
            )
            .into());
        }
    }
    let stalled_at = Instant::now();
    let max_window = capacity(max_wait.as_secs_f64());
    let beside = Group::join(&http, "", readers, 250, max_window).await?;
    let stop_rss = CancellationToken::new();
    let rss = sample_rss(pid, Duration::from_secs(1), stop_rss.clone());
    beside.record(true);
    let t0 = Instant::now();
    let total = (readers + stalled) as u64;
    loop {
        let n = live.api_viewers().await?;
        if n < total && r.dropped_first_s.is_none() {
            r.dropped_first_s = Some(stalled_at.elapsed().as_secs_f64());
        }
        if n <= readers as u64 && r.dropped_all_s.is_none() {
            r.dropped_all_s = Some(stalled_at.elapsed().as_secs_f64());
        }
        let elapsed = t0.elapsed();
        if (elapsed >= window && r.dropped_all_s.is_some()) || elapsed >= max_wait {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    beside.record(false);
    r.window_s = t0.elapsed().as_secs_f64();
    stop_rss.cancel();
    r.rss_stalled_max = rss.await?.iter().map(|s| s.1).max().unwrap_or(0);
    resume.cancel();
    for s in stalls {
        if let Ok(Ok(true)) = s.await {
            r.stalled_closed += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.rss_after = rss_bytes(pid)?;
    r.beside_stalled = Seen::of(beside.finish().await);
    live.stop().await;
    Ok(r)
}

/// R6: many viewers for a long time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct R6 {
    pub viewers: usize,
    pub seconds: f64,
    pub frames_published: u64,
    pub seen: Seen,
    pub rss_start: u64,
    pub rss_end: u64,
    pub rss_max: u64,
    /// Least squares over the samples after the first minute.
    pub rss_slope_kib_per_min: f64,
    /// Descriptors with the stream published and nobody watching, at the end with every
    /// viewer, and once they have gone.
    pub fds_idle: usize,
    pub fds_end: usize,
    pub fds_after: usize,
}

pub async fn r6(
    bin: &Path,
    clip: Arc<Clip>,
    viewers: usize,
    duration: Duration,
) -> Result<R6, BoxError> {
    let mut live = Live::start(bin, "", &[], clip).await?;
    let pid = live.pid();
    let fds_idle = fds(pid)?;
    let group = Group::join(
        &live.server.http,
        "",
        viewers,
        250,
        capacity(duration.as_secs_f64()),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stop_rss = CancellationToken::new();
    let rss = sample_rss(pid, Duration::from_secs(10), stop_rss.clone());
    let published0 = live.feed.published.load(Ordering::Relaxed);
    let t0 = Instant::now();
    group.record(true);
    tokio::time::sleep(duration).await;
    group.record(false);
    let seconds = t0.elapsed().as_secs_f64();
    let frames_published = live.feed.published.load(Ordering::Relaxed) - published0;
    stop_rss.cancel();
    let samples = rss.await?;
    let fds_end = fds(pid)?;
    live.feed.check().await?;
    let seen = Seen::of(group.finish().await);
    // The server notices each viewer leave; give it a moment before counting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while live.api_viewers().await? > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fds_after = fds(pid)?;
    let steady: Vec<(f64, u64)> = samples.iter().copied().filter(|s| s.0 >= 60.0).collect();
    let r = R6 {
        viewers,
        seconds,
        frames_published,
        seen,
        rss_start: samples.first().map_or(0, |s| s.1),
        rss_end: samples.last().map_or(0, |s| s.1),
        rss_max: samples.iter().map(|s| s.1).max().unwrap_or(0),
        rss_slope_kib_per_min: slope_kib_per_min(&steady),
        fds_idle,
        fds_end,
        fds_after,
    };
    live.stop().await;
    Ok(r)
}
