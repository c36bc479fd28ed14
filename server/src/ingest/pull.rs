//! Sources the server fetches: any URL or path ffmpeg reads (`rtsp://` cameras, `http(s)://`
//! HLS or FLV, `srt://` listeners, `rtmp://` servers, a file played in a loop), from `[[pull]]`
//! or `POST /api/streams`. (`tcp://` raw H.264 or FLV sources are `ingest::tcp`'s.)
//!
//! - A supervised ffmpeg child per source remuxes it: video copied (`-c:v copy`: H.264 or
//!   HEVC), audio made AAC (cameras send G.711 or Opus; AAC sources are re-encoded too, a
//!   small cost), written as MPEG-TS on its standard output and read with the same
//!   [`TsIngest`] as SRT. Its errors (the last lines) go to the log and the API.
//! - It is restarted with backoff (1 s, doubling to 30 s; back to 1 s once it ran a while)
//!   when it ends; the state the API shows: `connecting`, `live`, `retrying` with the last
//!   error, or `idle` (on demand, nobody watching).
//! - `on_demand = true`: ffmpeg starts on the stream's first viewer and stops
//!   [`ON_DEMAND_LINGER`] after the last one left.
//! - A source is a stream's publisher like any other (`publisher.protocol = "pull"`): a name
//!   already published elsewhere waits (retrying) until it is free.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::MediaIngest;
use super::ts::TsIngest;
use crate::config::{Config, Rung};
use crate::hub::{Hub, PublisherInfo, now_us};

/// How long an on-demand source runs on after its last viewer left.
pub const ON_DEMAND_LINGER: Duration = Duration::from_secs(10);
/// How often an on-demand source looks at its viewer count.
const VIEWERS_EVERY: Duration = Duration::from_millis(250);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run this long resets the backoff.
const RAN_A_WHILE: Duration = Duration::from_secs(30);

/// What a source is doing, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PullState {
    /// On demand, and nobody is watching.
    Idle,
    Connecting,
    Live,
    Retrying {
        error: String,
        retry_in_s: u64,
    },
}

/// One source.
pub struct Pull {
    pub name: String,
    pub source_url: String,
    pub on_demand: bool,
    /// The ladder for this stream, if the source gave one (`None`: the configured one).
    pub ladder: Option<Vec<Rung>>,
    state: Mutex<PullState>,
    stop: CancellationToken,
}

/// What the API shows of a source.
#[derive(Debug, Clone, Serialize)]
pub struct PullView {
    pub protocol: &'static str,
    pub source: String,
    pub on_demand: bool,
    #[serde(flatten)]
    pub state: PullState,
}

impl Pull {
    pub fn view(&self) -> PullView {
        PullView {
            protocol: "pull",
            source: self.source_url.clone(),
            on_demand: self.on_demand,
            state: self.state.lock().clone(),
        }
    }

    fn set(&self, state: PullState) {
        *self.state.lock() = state;
    }
}

/// Why a source cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PullError {
    #[error("{0:?} is not a valid stream name")]
    BadName(String),
    #[error("{0}")]
    BadUrl(String),
    #[error("stream {0:?} is pulled already")]
    Duplicate(String),
    #[error("stream {0:?} is being published")]
    Published(String),
}

/// Whether ffmpeg should be given `url`: a URL of a scheme it reads, or a path to a file.
/// `tcp://` is not (ingest::tcp's).
pub fn check_url(url: &str) -> Result<(), PullError> {
    const SCHEMES: [&str; 9] = [
        "rtsp", "rtsps", "http", "https", "srt", "rtmp", "rtmps", "udp", "file",
    ];
    if url.is_empty() || url.len() > 2048 || url.chars().any(char::is_control) {
        return Err(PullError::BadUrl("an empty, huge or garbled URL".into()));
    }
    match url.split_once("://") {
        Some((scheme, rest)) if SCHEMES.contains(&scheme) && !rest.is_empty() => Ok(()),
        Some((scheme, _)) => Err(PullError::BadUrl(format!(
            "unknown scheme {scheme:?}: use one of {} or a file path",
            SCHEMES.join(", ")
        ))),
        // A path: absolute, so that it does not depend on the server's working directory.
        None if url.starts_with('/') => Ok(()),
        None => Err(PullError::BadUrl(format!(
            "{url:?} is neither a URL nor an absolute path"
        ))),
    }
}

/// Whether the source is a file (played in a loop, at its own pace).
fn is_file(url: &str) -> bool {
    url.starts_with('/') || url.starts_with("file://")
}

/// The ffmpeg command line for a source.
fn ffmpeg_args(url: &str) -> Vec<String> {
    let mut args: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin"]
        .map(String::from)
        .to_vec();
    if is_file(url) {
        args.extend(["-re", "-stream_loop", "-1"].map(String::from));
    } else if url.starts_with("rtsp") {
        // UDP from a camera drops packets at the first sign of loss; TCP is what works.
        args.extend(["-rtsp_transport", "tcp"].map(String::from));
    }
    args.extend(["-i".to_string(), url.to_string()]);
    args.extend(
        [
            "-map",
            "0:v:0",
            "-map",
            "0:a:0?",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-f",
            "mpegts",
            // Each AAC frame its own PES, so audio leaves as promptly as video.
            "-pes_payload_size",
            "0",
            "pipe:1",
        ]
        .map(String::from),
    );
    args
}

/// Every source, by stream name.
#[derive(Default)]
pub struct Pulls {
    map: DashMap<String, Arc<Pull>>,
}

/// What a source is, as configured or posted.
#[derive(Debug, Clone)]
pub struct PullSpec {
    pub name: String,
    pub source_url: String,
    pub on_demand: bool,
    pub ladder: Option<Vec<Rung>>,
}

impl Pulls {
    pub fn get(&self, name: &str) -> Option<Arc<Pull>> {
        self.map.get(name).map(|p| p.clone())
    }

    /// The ladder a source set for its stream, if any.
    pub fn ladder(&self, name: &str) -> Option<Vec<Rung>> {
        self.map.get(name).and_then(|p| p.ladder.clone())
    }

    /// Starts a source; it runs until [`Pulls::stop`] or shutdown.
    pub fn start(
        self: &Arc<Self>,
        spec: PullSpec,
        hub: &Arc<Hub>,
        cfg: &Arc<Config>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Pull>, PullError> {
        if !crate::hub::valid_stream_name(&spec.name) {
            return Err(PullError::BadName(spec.name));
        }
        check_url(&spec.source_url)?;
        if hub
            .stream(&spec.name)
            .is_some_and(|s| s.publisher().is_some())
        {
            return Err(PullError::Published(spec.name));
        }
        let pull = Arc::new(Pull {
            name: spec.name.clone(),
            source_url: spec.source_url,
            on_demand: spec.on_demand,
            ladder: spec.ladder,
            state: Mutex::new(PullState::Connecting),
            stop: shutdown.child_token(),
        });
        match self.map.entry(spec.name.clone()) {
            dashmap::Entry::Occupied(_) => return Err(PullError::Duplicate(spec.name)),
            dashmap::Entry::Vacant(v) => {
                v.insert(pull.clone());
            }
        }
        let span = tracing::info_span!("pull", stream = %pull.name, source = %pull.source_url);
        let (p, hub, cfg, pulls) = (pull.clone(), hub.clone(), cfg.clone(), self.clone());
        tracker.spawn(
            async move {
                supervise(&p, &hub, &cfg).await;
                pulls.map.remove_if(&p.name, |_, q| Arc::ptr_eq(q, &p));
            }
            .instrument(span),
        );
        Ok(pull)
    }

    /// Stops a source (its ffmpeg, its publish); false if there is none of that name.
    pub fn stop(&self, name: &str) -> bool {
        match self.map.remove(name) {
            Some((_, p)) => {
                p.stop.cancel();
                true
            }
            None => false,
        }
    }
}

/// Whether anyone watches the stream now.
fn watched(hub: &Hub, name: &str) -> bool {
    hub.stream(name).is_some_and(|s| s.viewer_count() > 0)
}

/// Runs a source until it is stopped.
async fn supervise(pull: &Pull, hub: &Arc<Hub>, cfg: &Config) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if pull.on_demand && !watched(hub, &pull.name) {
            pull.set(PullState::Idle);
            let mut tick = tokio::time::interval(VIEWERS_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => if watched(hub, &pull.name) { break },
                    _ = pull.stop.cancelled() => return,
                }
            }
        }
        pull.set(PullState::Connecting);
        let started = Instant::now();
        let end = run(pull, hub, cfg).await;
        match end {
            RunEnd::Stopped => return,
            RunEnd::Unwatched => {
                tracing::info!("on-demand source stopped: nobody watching");
                backoff = Duration::from_secs(1);
                continue;
            }
            RunEnd::Failed(error) => {
                if started.elapsed() > RAN_A_WHILE {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(%error, retry_in_s = backoff.as_secs(), "source failed");
                crate::metrics::ingest_error("pull", "source");
                pull.set(PullState::Retrying {
                    error,
                    retry_in_s: backoff.as_secs(),
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = pull.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum RunEnd {
    Stopped,
    /// On demand: nobody watched for [`ON_DEMAND_LINGER`].
    Unwatched,
    Failed(String),
}

/// One ffmpeg run: claims the stream, reads ffmpeg's MPEG-TS into it until ffmpeg ends, the
/// source is stopped or (on demand) nobody watches.
async fn run(pull: &Pull, hub: &Arc<Hub>, cfg: &Config) -> RunEnd {
    let info = PublisherInfo {
        protocol: "pull",
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        since_ms: now_us() / 1000,
        clock: None,
    };
    let publisher = match hub.publish(&pull.name, info) {
        Ok(p) => p,
        Err(e) => return RunEnd::Failed(e.to_string()),
    };
    let mut child = match Command::new("ffmpeg")
        .args(ffmpeg_args(&pull.source_url))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return RunEnd::Failed(format!("cannot run ffmpeg: {e}")),
    };
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return RunEnd::Failed("ffmpeg's pipes".into());
    };
    // ffmpeg's last error line, for the log and the API.
    let last_error = Arc::new(Mutex::new(String::new()));
    let errors = {
        let last_error = last_error.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                *last_error.lock() = line.chars().take(300).collect();
            }
        })
    };
    let mut ts = TsIngest::new(MediaIngest::new(publisher));
    let mut buf = vec![0u8; 64 << 10];
    let keyframe_deadline = tokio::time::Instant::now() + cfg.ingest_idr_timeout;
    let mut unwatched_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(VIEWERS_EVERY);
    let failed = |why: String| {
        let tail = last_error.lock().clone();
        if tail.is_empty() {
            why
        } else {
            format!("{why}: {tail}")
        }
    };
    let end = loop {
        tokio::select! {
            r = stdout.read(&mut buf) => match r {
                Ok(0) => {
                    let _ = ts.finish();
                    let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    // Its stderr is read to the end before the reason is taken from it.
                    let _ = tokio::time::timeout(Duration::from_secs(1), errors).await;
                    break RunEnd::Failed(failed(format!("ffmpeg ended ({status})")));
                }
                Ok(n) => {
                    if let Err(e) = ts.push(&buf[..n]) {
                        break RunEnd::Failed(e.to_string());
                    }
                    if ts.got_keyframe() && *pull.state.lock() != PullState::Live {
                        tracing::info!("source live");
                        pull.set(PullState::Live);
                    }
                }
                Err(e) => break RunEnd::Failed(format!("ffmpeg's output: {e}")),
            },
            _ = tokio::time::sleep_until(keyframe_deadline), if !ts.got_keyframe() => {
                break RunEnd::Failed(failed(format!(
                    "no H.264 or HEVC keyframe in {} s",
                    cfg.ingest_idr_timeout.as_secs()
                )));
            }
            _ = tick.tick(), if pull.on_demand => {
                if watched(hub, &pull.name) {
                    unwatched_since = None;
                } else if unwatched_since.get_or_insert_with(Instant::now).elapsed() >= ON_DEMAND_LINGER {
                    break RunEnd::Unwatched;
                }
            }
            _ = ts.removed() => break RunEnd::Failed("removed by the server's operator".into()),
            _ = pull.stop.cancelled() => break RunEnd::Stopped,
        }
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    end
}

/// Starts the configured `[[pull]]` sources that are not `tcp://`.
pub fn start(
    pulls: &Arc<Pulls>,
    hub: &Arc<Hub>,
    cfg: &Arc<Config>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), String> {
    for p in cfg.pull.iter().filter(|p| p.tcp_addr().is_none()) {
        let spec = PullSpec {
            name: p.name.clone(),
            source_url: p.url.clone(),
            on_demand: p.on_demand,
            ladder: None,
        };
        pulls
            .start(spec, hub, cfg, shutdown, tracker)
            .map_err(|e| format!("[[pull]] {}: {e}", p.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_ffmpeg_reads_and_the_rest() {
        for ok in [
            "rtsp://10.0.0.5:554/stream1",
            "https://example.com/live/index.m3u8",
            "srt://10.0.0.9:9000?streamid=x",
            "rtmp://a/b/c",
            "/var/media/loop.mp4",
            "file:///var/media/loop.mp4",
        ] {
            assert_eq!(check_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "gopher://x",
            "tcp://1.2.3.4:5",
            "clip.mp4",
            "http://",
            "a\nb",
        ] {
            assert!(check_url(bad).is_err(), "{bad:?}");
        }
        let file = ffmpeg_args("/m/a.mp4").join(" ");
        assert!(file.contains("-re -stream_loop -1 -i /m/a.mp4"), "{file}");
        let rtsp = ffmpeg_args("rtsp://cam/1").join(" ");
        assert!(
            rtsp.contains("-rtsp_transport tcp -i rtsp://cam/1"),
            "{rtsp}"
        );
        assert!(rtsp.ends_with("-c:v copy -c:a aac -f mpegts -pes_payload_size 0 pipe:1"));
    }
}
