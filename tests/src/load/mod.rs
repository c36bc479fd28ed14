//! The fan-out load tool behind `make bench` (and its smoke test in `make test`).
//!
//! One run against one server:
//! 1. start the server and publish the paced, SEI-stamped clip with ffmpeg ([`source`]);
//! 2. wait for a probe viewer's first frame, then read the idle server's RSS;
//! 3. join burst: `burst` viewers spread evenly over `burst_window`, each timed from TCP connect
//!    to its first video frame, and checked to start on a keyframe;
//! 4. ramp the remaining viewers at `ramp_per_sec`, let the server settle;
//! 5. steady window: server CPU (utime+stime from /proc/PID/stat) and the bytes viewers
//!    received, every frame's latency, and gaps in the stamped sequence.
//!
//! Latency is measured twice. "Delivery" is onair's own: receipt minus the server's ingest
//! wall clock in each media header. "End to end" works for any server: receipt minus the wall
//! clock the pacer wrote into the frame's SEI just before handing it to the publishing ffmpeg.

pub mod abr;
pub mod flv;
pub mod hls;
pub mod ladder;
pub mod nms;
pub mod source;
pub mod viewers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{BoxError, Server};
use source::{Clip, Feed};
use viewers::{Proto, Shared, ViewerStats};

/// The stream name used on every server.
pub const STREAM: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Onair,
    /// onair with an ffmpeg ladder of two rungs: the viewers split over three renditions.
    OnairLadder,
    /// The same ladder, every viewer pinned to the source: what the ladder's ffmpeg and its
    /// rungs' ingest cost the machine, without a second or third fan-out group.
    OnairLadderSource,
    Nms,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Onair => "onair",
            Target::OnairLadder => "onair, 3 renditions",
            Target::OnairLadderSource => "onair, ladder, all on source",
            Target::Nms => "node-media-server",
        }
    }
}

/// How many viewers, how they arrive, and how long they are measured.
#[derive(Debug, Clone)]
pub struct Plan {
    pub viewers: usize,
    /// Viewers that join in the burst (the first ones).
    pub burst: usize,
    pub burst_window: Duration,
    /// Arrival rate of the viewers after the burst.
    pub ramp_per_sec: usize,
    /// Pause after the last viewer started, before measuring.
    pub settle: Duration,
    pub window: Duration,
}

/// Where the servers come from.
#[derive(Debug, Clone)]
pub struct Env {
    pub onair_bin: PathBuf,
    /// node-media-server's `bin/app.js` (see [`nms::install`]).
    pub nms_app: Option<PathBuf>,
}

/// Percentiles of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Pcts {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Pcts {
    /// From samples in µs, in ms.
    pub(crate) fn from_us(mut v: Vec<u32>) -> Pcts {
        if v.is_empty() {
            return Pcts::default();
        }
        v.sort_unstable();
        let at = |q: f64| f64::from(v[((v.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Pcts {
            n: v.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// One run's results for one server.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub server: String,
    pub viewers: usize,
    /// Of those, how many joined in the burst (a failed one has no TTFF).
    pub burst: usize,
    /// Viewers that failed (connect, upgrade, disconnect), with the first few reasons.
    pub failed: usize,
    pub errors: Vec<String>,
    pub stream_kbps: u64,
    pub window_s: f64,
    pub cpu_s: f64,
    pub bytes: u64,
    pub rss_idle: u64,
    pub rss_burst: u64,
    pub rss_full: u64,
    /// Server ingest → viewer (onair only).
    pub delivery_ms: Option<Pcts>,
    /// Publisher stamp → viewer (any server).
    pub e2e_ms: Pcts,
    /// Join burst, connect → first video frame.
    pub ttff_ms: Pcts,
    /// Viewers of the burst whose first video frame was a keyframe, and of all viewers.
    pub burst_key_first: f64,
    pub key_first: f64,
    /// Video frames published during the window, and the fewest / most any viewer missed.
    pub frames_published: u64,
    pub lost_max: u64,
    pub lost_total: u64,
    pub frames_min: u64,
    pub unstamped: u64,
    pub skips: u64,
    /// onair's dashboard feed with every viewer connected (after the window).
    pub dashboard: Option<DashboardProbe>,
    /// With a ladder: the ladder's ffmpeg over the window (CPU seconds; not in `cpu_s`), and
    /// each rendition as the server's API saw it at the window's end.
    pub ladder_cpu_s: Option<f64>,
    pub renditions: Vec<RenditionLoad>,
}

/// One rendition of a stream, from `GET /api/streams/NAME`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RenditionLoad {
    pub name: String,
    /// Empty until the rendition has its init.
    pub codec: String,
    pub height: u64,
    /// Measured over the last stats period.
    pub bitrate_kbps: u64,
    pub viewers: u64,
}

/// The renditions in a `GET /api/streams/NAME` answer.
pub fn renditions_of(detail: &serde_json::Value) -> Vec<RenditionLoad> {
    detail["renditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| RenditionLoad {
            name: r["name"].as_str().unwrap_or_default().to_string(),
            codec: r["codec"].as_str().unwrap_or_default().to_string(),
            height: r["height"].as_u64().unwrap_or(0),
            bitrate_kbps: r["bitrate_kbps"].as_f64().unwrap_or(0.0).round() as u64,
            viewers: r["viewers"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The dashboard feed at full load: what one operator's browser gets.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DashboardProbe {
    /// Request to the first snapshot (history comes before it).
    pub first_snapshot_ms: f64,
    /// JSON bytes of one snapshot (50 viewer rows of the page) and of the history.
    pub snapshot_bytes: usize,
    pub history_bytes: usize,
    /// Viewers the snapshot counts, and `/api/streams` counts.
    pub viewers_feed: u64,
    pub viewers_api: u64,
}

impl Report {
    pub fn gb(&self) -> f64 {
        self.bytes as f64 / 1e9
    }
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_s / self.gb()
    }
    pub fn gbps_per_core(&self) -> f64 {
        self.gb() * 8.0 / self.cpu_s
    }
    pub fn gbps(&self) -> f64 {
        self.gb() * 8.0 / self.window_s
    }
    /// RSS growth per viewer between the burst and the full count.
    pub fn rss_slope_kb(&self) -> f64 {
        let added = self.viewers.saturating_sub(self.burst) as f64;
        (self.rss_full as f64 - self.rss_burst as f64) / added / 1024.0
    }
    /// RSS per viewer above the idle (publishing, unwatched) server.
    pub fn rss_per_viewer_kb(&self) -> f64 {
        (self.rss_full as f64 - self.rss_idle as f64) / self.viewers as f64 / 1024.0
    }
}

/// onair's configuration for the fan-out and HLS runs: no ladder, so that onair and
/// node-media-server deliver the same single rendition, and no ffmpeg child takes CPU from
/// the servers being compared (the ladder's cost is measured on its own).
pub fn fan_out_config() -> Result<String, BoxError> {
    write_config("fan-out.toml", "[streams.\"*\"]\nladder = []\n")
}

/// Writes an onair config file into this process's temporary folder; returns its path.
pub fn write_config(name: &str, text: &str) -> Result<String, BoxError> {
    let dir = std::env::temp_dir().join(format!("onair-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// The ladder of the three-renditions run: a 480p and a 240p rung at the source's video
/// bitrate, so that every rendition's frames are about the size of the source's and the run
/// measures what a second and third rendition cost the fan-out, not what smaller frames cost
/// per byte (much of a write's cost is per call; see docs/benchmarks.md).
pub fn ladder_config(video_kbps: u32) -> Result<String, BoxError> {
    write_config(
        "ladder.toml",
        &format!(
            "[streams.\"*\"]\nladder = [{{ name = \"480p\", height = 480, video_kbps = {video_kbps} }}, \
             {{ name = \"240p\", height = 240, video_kbps = {video_kbps} }}]\n"
        ),
    )
}

/// The renditions of the three-renditions run, as the viewers ask for them in turn (no
/// parameter: automatic, which starts on the source and stays there on loopback, and sends
/// receipts).
const LADDER_PATHS: [&str; 3] = ["", "?rendition=480p", "?rendition=240p"];
const LADDER_HEIGHTS: [u64; 3] = [720, 480, 240];

/// A server under test: onair with the target it runs as.
enum Running {
    Onair { server: Server, target: Target },
    Nms(nms::Nms),
}

impl Running {
    async fn start(target: Target, env: &Env, clip: &Clip) -> Result<Running, BoxError> {
        Ok(match target {
            Target::Onair | Target::OnairLadder | Target::OnairLadderSource => {
                let config = if target != Target::Onair {
                    ladder_config(clip.spec.video_kbps)?
                } else {
                    fan_out_config()?
                };
                Running::Onair {
                    server: Server::start_bin(
                        &env.onair_bin,
                        &["--config", &config],
                        &[("ONAIR_LOG", "info")],
                    )
                    .await,
                    target,
                }
            }
            Target::Nms => {
                let app = env
                    .nms_app
                    .as_deref()
                    .ok_or("node-media-server is not installed")?;
                Running::Nms(nms::Nms::start(app).await?)
            }
        })
    }

    fn pid(&self) -> Result<u32, BoxError> {
        match self {
            Running::Onair { server, .. } => Ok(server.pid()),
            Running::Nms(n) => n.pid().ok_or_else(|| "node-media-server exited".into()),
        }
    }

    fn rtmp_url(&self) -> String {
        match self {
            Running::Onair { server, .. } => server.rtmp_url(STREAM),
            Running::Nms(n) => format!("rtmp://{}/live/{STREAM}", n.rtmp),
        }
    }

    fn viewers(&self) -> Shared {
        let (proto, addr, paths) = match self {
            Running::Onair { server, target } => {
                let params: &[&str] = match target {
                    Target::OnairLadder => &LADDER_PATHS,
                    Target::OnairLadderSource => &["?rendition=source"],
                    _ => &[""],
                };
                let paths = params.iter().map(|p| format!("/ws/{STREAM}{p}")).collect();
                (Proto::Onair, server.http.clone(), paths)
            }
            Running::Nms(n) => (
                Proto::WsFlv,
                n.http.clone(),
                vec![format!("/live/{STREAM}.flv")],
            ),
        };
        Shared {
            proto,
            addr,
            paths,
            recording: Default::default(),
            stop: CancellationToken::new(),
            started: AtomicUsize::new(0),
            progress: Notify::new(),
        }
    }

    async fn stop(self) {
        match self {
            Running::Onair { mut server, .. } => {
                let _ = server.terminate().await;
            }
            Running::Nms(n) => n.stop().await,
        }
    }
}

/// CPU seconds (user + system, all threads) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').ok_or("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).ok_or("no utime")?.parse::<u64>()?
        + f.get(12).ok_or("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

pub fn rss_bytes(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kb * 1024)
}

/// Waits until `n` viewers have their first video frame, or `timeout`.
pub async fn wait_started(shared: &Shared, n: usize, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.progress.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let started = shared.started.load(Ordering::Relaxed);
        if started >= n {
            return started;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return shared.started.load(Ordering::Relaxed);
        }
    }
}

/// Runs `plan` against `target` once and reports.
pub async fn run(
    target: Target,
    plan: &Plan,
    clip: Arc<Clip>,
    env: &Env,
) -> Result<Report, BoxError> {
    let server = Running::start(target, env, &clip).await?;
    let result = measure(&server, plan, clip).await;
    server.stop().await;
    result
}

async fn measure(server: &Running, plan: &Plan, clip: Arc<Clip>) -> Result<Report, BoxError> {
    let pid = server.pid()?;
    let stream_kbps = clip.kbps();
    let frame_capacity = (plan.window.as_secs_f64() * f64::from(clip.spec.fps) * 1.1) as usize + 16;
    let mut feed = Feed::start(clip, &server.rtmp_url())?;
    let ladder = match server {
        Running::Onair { server, target } if *target != Target::Onair => {
            // The rungs come a moment after the source; every viewer's rendition must be up.
            abr::wait_for_heights(server, STREAM, &LADDER_HEIGHTS).await?;
            Some(server)
        }
        _ => None,
    };

    // The stream is live once a probe viewer gets a frame.
    let probe = Arc::new(server.viewers());
    let probe_task = tokio::spawn(viewers::run(probe.clone(), 0, 0));
    let live = wait_started(&probe, 1, Duration::from_secs(20)).await;
    probe.stop.cancel();
    let probe_stats = probe_task.await?;
    feed.check().await?;
    if live == 0 {
        return Err(format!("the stream never went live: {:?}", probe_stats.error).into());
    }
    // A full GOP cached, the probe's connection gone: the idle server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_bytes(pid)?;

    let shared = Arc::new(server.viewers());
    let mut tasks = Vec::with_capacity(plan.viewers);
    let burst = plan.burst.min(plan.viewers);
    let start = tokio::time::Instant::now();
    for i in 0..burst {
        tokio::time::sleep_until(start + plan.burst_window.mul_f64(i as f64 / burst as f64)).await;
        tasks.push(tokio::spawn(viewers::run(
            shared.clone(),
            i,
            frame_capacity,
        )));
    }
    wait_started(&shared, burst, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_burst = rss_bytes(pid)?;

    let ramp_start = tokio::time::Instant::now();
    let gap = Duration::from_secs_f64(1.0 / plan.ramp_per_sec.max(1) as f64);
    for i in burst..plan.viewers {
        tokio::time::sleep_until(ramp_start + gap * (i - burst) as u32).await;
        tasks.push(tokio::spawn(viewers::run(
            shared.clone(),
            i,
            frame_capacity,
        )));
    }
    wait_started(&shared, plan.viewers, Duration::from_secs(20)).await;
    tokio::time::sleep(plan.settle).await;
    feed.check().await?;

    let published0 = feed.published.load(Ordering::Relaxed);
    let children = ladder.map(|_| abr::children(pid)).unwrap_or_default();
    let children_cpu = || -> f64 { children.iter().filter_map(|p| cpu_seconds(*p).ok()).sum() };
    let ladder_cpu0 = children_cpu();
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    shared.recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(plan.window).await;
    shared.recording.store(false, Ordering::Relaxed);
    let cpu_s = cpu_seconds(pid)? - cpu0;
    let window_s = t0.elapsed().as_secs_f64();
    let ladder_cpu_s = ladder.map(|_| children_cpu() - ladder_cpu0);
    let renditions = match ladder {
        Some(s) => renditions_under_load(s).await?,
        None => Vec::new(),
    };
    let frames_published = feed.published.load(Ordering::Relaxed) - published0;
    let rss_full = rss_bytes(pid)?;
    feed.check().await?;
    let dashboard = match server {
        // A build without the feed (an older onair in an A/B run) just has no figures.
        Running::Onair { server, .. } => tokio::spawn(probe_dashboard(server.http.clone()))
            .await
            .ok(),
        Running::Nms(_) => None,
    };

    shared.stop.cancel();
    let mut stats = Vec::with_capacity(tasks.len());
    for t in tasks {
        stats.push(t.await?);
    }
    feed.stop().await;
    Ok(summarize(
        server,
        plan,
        stats,
        Summary {
            dashboard,
            stream_kbps,
            window_s,
            cpu_s,
            ladder_cpu_s,
            renditions,
            rss_idle,
            rss_burst,
            rss_full,
            frames_published,
        },
    ))
}

/// Opens the dashboard's feed as a browser would and times its first snapshot.
async fn probe_dashboard(http: String) -> DashboardProbe {
    let asked = Instant::now();
    let mut feed = crate::Feed::open(&http, "limit=50").await;
    let (_, history) = feed.next(Duration::from_secs(5)).await;
    let (_, snapshot) = feed.next(Duration::from_secs(5)).await;
    let first_snapshot_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let (_, body) = crate::http_get(&http, "/api/streams")
        .await
        .expect("GET /api/streams");
    let api: serde_json::Value = serde_json::from_str(&body).expect("JSON from /api/streams");
    DashboardProbe {
        first_snapshot_ms,
        snapshot_bytes: snapshot.to_string().len(),
        history_bytes: history.to_string().len(),
        viewers_feed: snapshot["totals"]["viewers"].as_u64().unwrap_or(0),
        viewers_api: api[0]["viewers"].as_u64().unwrap_or(0),
    }
}

/// The stream's renditions as the API has them: name, height, measured bitrate, viewers.
async fn renditions_under_load(server: &Server) -> Result<Vec<RenditionLoad>, BoxError> {
    let (status, body) = crate::http_get(&server.http, &format!("/api/streams/{STREAM}")).await?;
    if status != 200 {
        return Err(format!("GET /api/streams/{STREAM}: {status} {body}").into());
    }
    Ok(renditions_of(&serde_json::from_str(&body)?))
}

struct Summary {
    dashboard: Option<DashboardProbe>,
    stream_kbps: u64,
    window_s: f64,
    cpu_s: f64,
    ladder_cpu_s: Option<f64>,
    renditions: Vec<RenditionLoad>,
    rss_idle: u64,
    rss_burst: u64,
    rss_full: u64,
    frames_published: u64,
}

fn summarize(server: &Running, plan: &Plan, stats: Vec<ViewerStats>, s: Summary) -> Report {
    let burst = plan.burst.min(stats.len());
    let share = |v: &[ViewerStats]| {
        v.iter().filter(|s| s.first_video_key == Some(true)).count() as f64 / v.len().max(1) as f64
    };
    let mut r = Report {
        server: match server {
            Running::Onair { target, .. } => target.name().into(),
            Running::Nms(_) => Target::Nms.name().into(),
        },
        viewers: stats.len(),
        burst,
        stream_kbps: s.stream_kbps,
        dashboard: s.dashboard,
        window_s: s.window_s,
        cpu_s: s.cpu_s,
        ladder_cpu_s: s.ladder_cpu_s,
        renditions: s.renditions,
        rss_idle: s.rss_idle,
        rss_burst: s.rss_burst,
        rss_full: s.rss_full,
        frames_published: s.frames_published,
        burst_key_first: share(&stats[..burst]),
        key_first: share(&stats),
        ttff_ms: Pcts::from_us(
            stats[..burst]
                .iter()
                .filter_map(|s| s.ttff_us)
                .map(|t| t.min(u64::from(u32::MAX)) as u32)
                .collect(),
        ),
        frames_min: stats.iter().map(|s| s.video_frames).min().unwrap_or(0),
        ..Default::default()
    };
    let mut delivery = Vec::new();
    let mut e2e = Vec::new();
    for st in stats {
        if let Some(e) = st.error {
            r.failed += 1;
            if r.errors.len() < 5 {
                r.errors.push(e);
            }
        }
        r.bytes += st.bytes;
        r.lost_max = r.lost_max.max(st.lost);
        r.lost_total += st.lost;
        r.unstamped += st.unstamped;
        r.skips += st.skips;
        delivery.extend_from_slice(&st.delivery_us);
        e2e.extend_from_slice(&st.e2e_us);
    }
    r.delivery_ms = matches!(server, Running::Onair { .. }).then(|| Pcts::from_us(delivery));
    r.e2e_ms = Pcts::from_us(e2e);
    r
}

/// The workspace's target folder.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The working folder for clips and the peer's install: `target/bench`.
pub fn work_dir() -> PathBuf {
    target_dir().join("bench")
}
