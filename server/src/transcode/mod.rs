//! The ladder: one supervised ffmpeg child per live stream, making lower renditions of the
//! source that come back into the hub as renditions of the same stream.
//!
//! - ffmpeg (the system's) reads the source as fragmented MP4 on its standard input (any codec
//!   the hub carries: H.264, HEVC, AV1, VP9), written here from the source's lossless reader:
//!   the publisher and the source's viewers never wait for it. When ffmpeg cannot keep up, the
//!   reader's queue drops to the next keyframe and counts it. The rungs are H.264 whatever the
//!   source's codec, so that every browser has one it can decode.
//! - Every rung is encoded with x264 `veryfast`/`zerolatency`, `-force_key_frames source` and
//!   `-copyts`, so its keyframes sit where the source's are and its timestamps are the
//!   source's: viewers switch between renditions at those keyframes. Audio is copied.
//! - Each rung comes back as FLV over a Unix socket in a directory only this process's user can
//!   enter, read with the same FLV and ingest code as a TCP source.
//! - Supervision: started at the source's first keyframe; restarted with backoff when ffmpeg
//!   dies; restarted when the source's configuration changes; stopped with the publish. A rung
//!   that falls more than [`MAX_RUNG_LAG_MS`] behind its source is dropped (a log line, a
//!   metric, a note in the API) instead of adding latency, and ffmpeg restarts without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use onair_protocol::flv::TagReader;
use onair_protocol::fmp4;
use onair_protocol::wire::{StatusCode, TrackParams};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::process::{ChildStdin, Command};
use tracing::Instrument;

use crate::config::{Config, Rung, plan_ladder};
use crate::hub::{Event, Hub, InitConfig, Item, QueueLimits, RenditionInfo, Stream, Tasks};
use crate::ingest::MediaIngest;

/// A rung further behind its source than this is dropped.
pub const MAX_RUNG_LAG_MS: u64 = 3000;
/// How long a fresh ffmpeg may take before its rungs are held to [`MAX_RUNG_LAG_MS`].
const WARM_UP: Duration = Duration::from_secs(8);
/// How long ffmpeg has to connect each rung's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API and dashboard show of a stream's ladder.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TranscoderState {
    pub running: bool,
    pub restarts: u32,
    /// ffmpeg's own `speed=` (1.0 is real time).
    pub speed: Option<f64>,
    /// The rungs it is making now.
    pub rungs: Vec<String>,
    /// Rungs dropped for not keeping real time, with why.
    pub dropped_rungs: Vec<String>,
    /// Source frames the ladder's input queue dropped because ffmpeg fell behind.
    pub input_dropped: u64,
    pub last_error: Option<String>,
}

/// Every stream's ladder state.
#[derive(Default)]
pub struct Transcoders {
    states: DashMap<String, Arc<Mutex<TranscoderState>>>,
}

impl Transcoders {
    pub fn state(&self, stream: &str) -> Option<TranscoderState> {
        self.states.get(stream).map(|s| s.lock().clone())
    }
}

/// Starts the task that gives every published stream its ladder.
pub fn start(
    hub: Arc<Hub>,
    cfg: Arc<Config>,
    pulls: Arc<crate::ingest::pull::Pulls>,
    tasks: Tasks,
) -> Arc<Transcoders> {
    let transcoders = Arc::new(Transcoders::default());
    let mut published = hub.published();
    let t = transcoders.clone();
    let inner = tasks.clone();
    tasks.tracker.spawn(async move {
        loop {
            let stream = tokio::select! {
                r = published.recv() => match r {
                    Ok(s) => s,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "ladder: missed publishes");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = inner.shutdown.cancelled() => return,
            };
            let mut policy = cfg.stream_settings(&stream.name);
            // A source added through the API may bring its own ladder.
            if let Some(ladder) = pulls.ladder(&stream.name) {
                policy.ladder = Some(ladder);
            }
            if policy.ladder.as_ref().is_some_and(|l| l.is_empty()) {
                continue; // `ladder = []`
            }
            let state = Arc::new(Mutex::new(TranscoderState::default()));
            t.states.insert(stream.name.clone(), state.clone());
            let span = tracing::info_span!("ladder", stream = %stream.name);
            let (t, tasks) = (t.clone(), inner.clone());
            inner.tracker.spawn(
                async move {
                    let name = stream.name.clone();
                    supervise(stream, policy.ladder, state.clone(), tasks).await;
                    // Gone with its publish (unless a newer publish has its own by now), so
                    // the map holds live streams only.
                    t.states.remove_if(&name, |_, s| Arc::ptr_eq(s, &state));
                }
                .instrument(span),
            );
        }
    });
    transcoders
}

/// Why one ffmpeg run ended.
#[derive(Debug)]
enum RunEnd {
    /// The publish ended.
    SourceEnded,
    /// The source's configuration changed: start again with it.
    NewInit(Arc<InitConfig>),
    Died(String),
    TooSlow(String),
    Shutdown,
}

/// One publish's ladder, from its first keyframe to its end.
async fn supervise(
    stream: Arc<Stream>,
    configured: Option<Vec<Rung>>,
    state: Arc<Mutex<TranscoderState>>,
    tasks: Tasks,
) {
    let source = stream.source();
    let reader = source.subscribe_lossless(QueueLimits::DEFAULT);
    let mut init: Option<Arc<InitConfig>> = None;
    let mut dropped: Vec<String> = Vec::new();
    let mut backoff = Duration::from_secs(1);
    let mut run = 0u32;
    'publish: loop {
        // Up to the first keyframe under a configuration with video.
        let first = loop {
            let event = tokio::select! {
                e = reader.next() => e,
                _ = tasks.shutdown.cancelled() => break 'publish,
            };
            match event {
                Event::Item(Item::Init(i)) => init = Some(i),
                Event::Item(Item::Media(f))
                    if f.is_video()
                        && f.header.keyframe
                        && init.as_ref().is_some_and(|i| i.video().is_some()) =>
                {
                    break f;
                }
                Event::Item(Item::Status(StatusCode::Waiting | StatusCode::Ended, _))
                | Event::Ended => break 'publish,
                _ => {}
            }
        };
        let Some(current) = init.clone() else {
            continue;
        };
        let height = match current.video().map(|v| v.params) {
            Some(TrackParams::Video { height, .. }) => u32::from(height),
            _ => continue,
        };
        let rungs: Vec<Rung> = plan_ladder(configured.as_deref(), height)
            .into_iter()
            .filter(|r| !dropped.contains(&r.name))
            .collect();
        if rungs.is_empty() {
            tracing::info!(height, "ladder: no rung below the source; none made");
            // Wait for a configuration that may have some (a republish at a larger size).
            continue;
        }
        if stream.rendition_count() > 1 {
            // A multitrack publish (no rung of this ladder is live between runs): the
            // publisher's own tracks are the stream's other renditions.
            tracing::info!(
                "ladder: the publish sends renditions of its own (multitrack); none made"
            );
            continue;
        }
        run += 1;
        let started = Instant::now();
        {
            let mut s = state.lock();
            s.running = true;
            s.rungs = rungs.iter().map(|r| r.name.clone()).collect();
        }
        tracing::info!(rungs = ?state.lock().rungs, "ladder: starting ffmpeg");
        let end = run_ffmpeg(
            &stream, &current, &rungs, first, &reader, &state, &tasks, run,
        )
        .await;
        state.lock().running = false;
        state.lock().input_dropped = reader.dropped();
        match end {
            RunEnd::SourceEnded | RunEnd::Shutdown => break,
            RunEnd::NewInit(i) => {
                tracing::info!("ladder: the source's configuration changed; restarting");
                init = Some(i);
            }
            RunEnd::TooSlow(name) => {
                tracing::warn!(rung = %name, "ladder: rung dropped: it could not keep real time");
                crate::metrics::ladder_rung_dropped(&name);
                state.lock().dropped_rungs.push(format!(
                    "{name}: more than {MAX_RUNG_LAG_MS} ms behind the source"
                ));
                dropped.push(name);
            }
            RunEnd::Died(why) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
                tracing::warn!(error = %why, backoff_s = backoff.as_secs(), "ladder: ffmpeg failed; restarting");
                crate::metrics::ladder_restart();
                {
                    let mut s = state.lock();
                    s.restarts += 1;
                    s.last_error = Some(why);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tasks.shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    state.lock().running = false;
}

/// The ffmpeg command line for `rungs`, writing rung `i` to `sockets[i]`.
fn ffmpeg_args(rungs: &[Rung], sockets: &[PathBuf]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostats",
        "-progress",
        "pipe:1",
        "-stats_period",
        "1",
        "-fflags",
        "+nobuffer",
        "-f",
        "mp4",
        "-i",
        "pipe:0",
        "-copyts",
    ]
    .map(String::from)
    .to_vec();
    let n = rungs.len();
    let mut graph = format!(
        "[0:v]split={n}{}",
        (0..n).map(|i| format!("[s{i}]")).collect::<String>()
    );
    for (i, r) in rungs.iter().enumerate() {
        graph.push_str(&format!(";[s{i}]scale=-2:{}", r.height));
        if let Some(fps) = r.fps {
            graph.push_str(&format!(",fps={fps}"));
        }
        graph.push_str(&format!("[o{i}]"));
    }
    args.extend(["-filter_complex".into(), graph]);
    for (i, (r, socket)) in rungs.iter().zip(sockets).enumerate() {
        let k = r.video_kbps;
        args.extend(
            [
                "-map",
                &format!("[o{i}]"),
                "-map",
                "0:a?",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-tune",
                "zerolatency",
                "-b:v",
                &format!("{k}k"),
                "-maxrate",
                &format!("{k}k"),
                "-bufsize",
                &format!("{}k", k * 2),
                "-force_key_frames",
                "source",
                // The publisher's user-data SEI (timestamps, tags) goes on into every rung, on
                // the same frame, as it does in the source rendition.
                "-udu_sei",
                "1",
                "-fps_mode",
                "passthrough",
                // The encoder's own default time base is 1/fps, which would round every
                // timestamp to a frame tick: off the source's by up to a frame.
                "-enc_time_base",
                "1:1000",
                "-c:a",
                "copy",
                "-f",
                "flv",
                "-flvflags",
                "no_duration_filesize",
                &format!("unix:{}", socket.display()),
            ]
            .map(String::from),
        );
    }
    args
}

/// A private directory for one run's sockets, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn create(stream: &str, run: u32) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!(
            "onair-ladder-{}-{stream}-{run}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_ffmpeg(
    stream: &Arc<Stream>,
    init: &Arc<InitConfig>,
    rungs: &[Rung],
    first: crate::hub::Frame,
    reader: &crate::hub::Lossless,
    state: &Mutex<TranscoderState>,
    tasks: &Tasks,
    run: u32,
) -> RunEnd {
    let dir = match SocketDir::create(&stream.name, run) {
        Ok(d) => d,
        Err(e) => return RunEnd::Died(format!("socket directory: {e}")),
    };
    let sockets: Vec<PathBuf> = (0..rungs.len())
        .map(|i| dir.path().join(format!("{i}.sock")))
        .collect();
    let mut listeners = Vec::new();
    for s in &sockets {
        match UnixListener::bind(s) {
            Ok(l) => listeners.push(l),
            Err(e) => return RunEnd::Died(format!("socket {}: {e}", s.display())),
        }
    }
    let mut child = match Command::new("ffmpeg")
        .args(ffmpeg_args(rungs, &sockets))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return RunEnd::Died(format!("cannot run ffmpeg: {e}")),
    };
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return RunEnd::Died("ffmpeg's pipes".into());
    };
    // ffmpeg's errors: the last lines, for the log and the API.
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let errors = errors.clone();
        tasks.tracker.spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut e = errors.lock();
                if e.len() == 5 {
                    e.remove(0);
                }
                e.push(line.chars().take(300).collect());
            }
        });
    }
    let died = |child_status: String, errors: &Mutex<Vec<String>>| {
        let tail = errors.lock().join(" | ");
        RunEnd::Died(if tail.is_empty() {
            child_status
        } else {
            format!("{child_status}: {tail}")
        })
    };

    // The input: the source so far (its configuration and the first keyframe), then every
    // frame as it comes. ffmpeg only connects its outputs once it has read some input.
    let mut buf = Vec::with_capacity(64 << 10);
    let mut mp4 = match Mp4Feed::start(init, &mut buf) {
        Ok(f) => f,
        Err(e) => return RunEnd::Died(format!("ffmpeg's input: {e}")),
    };
    mp4.frame(&first, &mut buf);
    if let Err(e) = stdin.write_all(&buf).await {
        return died(format!("ffmpeg's input: {e}"), &errors);
    }

    // Each rung's socket: accepted, and read back into its rendition.
    let (rung_end_tx, mut rung_end) = tokio::sync::mpsc::channel::<String>(rungs.len());
    let mut writers = Vec::new();
    let mut rung_tasks = Vec::new();
    for (rung, listener) in rungs.iter().zip(&listeners) {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        // Feed ffmpeg while it gets to connecting: it opens its outputs once it has input.
        let accepted = loop {
            let event = tokio::select! {
                a = tokio::time::timeout_at(deadline, listener.accept()) => break a,
                status = child.wait() => {
                    return died(format!("ffmpeg exited ({})", status.map(|s| s.to_string()).unwrap_or_default()), &errors);
                }
                e = reader.next() => e,
            };
            if let Some(end) = feed(event, &mut mp4, &mut stdin, &mut buf).await {
                return end;
            }
        };
        let conn = match accepted {
            Ok(Ok((conn, _))) => conn,
            Ok(Err(e)) => return RunEnd::Died(format!("rung {}: {e}", rung.name)),
            Err(_) => return died(format!("rung {} never connected", rung.name), &errors),
        };
        let Some(writer) = stream.add_rendition(RenditionInfo {
            name: rung.name.clone(),
            height: rung.height,
            nominal_kbps: rung.video_kbps,
            ..Default::default()
        }) else {
            return RunEnd::Died(format!("rendition {} exists already", rung.name));
        };
        writers.push(writer.rendition.clone());
        let (tx, name) = (rung_end_tx.clone(), rung.name.clone());
        rung_tasks.push(
            tasks.tracker.spawn(
                async move {
                    let why = read_rung(conn, MediaIngest::new(writer)).await;
                    let _ = tx.send(format!("rung {name}: {why}")).await;
                }
                .in_current_span(),
            ),
        );
    }
    drop(listeners);

    let started = Instant::now();
    let mut progress = BufReader::new(stdout).lines();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        // Only cancel-safe futures race here; the write to ffmpeg happens after, whole.
        let event = tokio::select! {
            e = reader.next() => e,
            line = progress.next_line() => {
                if let Ok(Some(line)) = line
                    && let Some(speed) = line.strip_prefix("speed=")
                {
                    let speed = speed.trim().trim_end_matches('x').parse::<f64>().ok();
                    state.lock().speed = speed;
                }
                continue;
            }
            status = child.wait() => {
                break died(format!("ffmpeg exited ({})", status.map(|s| s.to_string()).unwrap_or_default()), &errors);
            }
            why = rung_end.recv() => break died(why.unwrap_or_default(), &errors),
            _ = tick.tick() => {
                state.lock().input_dropped = reader.dropped();
                if started.elapsed() < WARM_UP {
                    continue;
                }
                let source = stream.source().newest_dts().unwrap_or(0);
                if let Some(slow) = writers.iter().find(|w| {
                    source.saturating_sub(w.newest_dts().unwrap_or(0)) > MAX_RUNG_LAG_MS
                }) {
                    break RunEnd::TooSlow(slow.name());
                }
                continue;
            }
            _ = tasks.shutdown.cancelled() => break RunEnd::Shutdown,
        };
        if let Some(end) = feed(event, &mut mp4, &mut stdin, &mut buf).await {
            break end;
        }
    };
    // Dropping the child kills it; dropping the writers' tasks' sockets ends them, and each
    // writer removes its rendition (its viewers move to the nearest remaining one).
    let _ = child.start_kill();
    drop(stdin);
    let _ = child.wait().await;
    // Its sockets end with it: each rung's reader drops its writer, which removes the
    // rendition. Waited for, so that a restart can add renditions of the same names.
    for t in rung_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    end
}

/// Writes a source event to ffmpeg; `Some` when the run must end.
async fn feed(
    event: Event,
    mp4: &mut Mp4Feed,
    stdin: &mut ChildStdin,
    buf: &mut Vec<u8>,
) -> Option<RunEnd> {
    buf.clear();
    match event {
        Event::Item(Item::Media(f)) => mp4.frame(&f, buf),
        Event::Item(Item::Init(i)) => return Some(RunEnd::NewInit(i)),
        Event::Item(Item::Status(StatusCode::Waiting | StatusCode::Ended, _)) | Event::Ended => {
            return Some(RunEnd::SourceEnded);
        }
        Event::Item(Item::Status(..)) | Event::Lost(_) => return None,
    }
    // ffmpeg that takes nothing for this long has stopped: the reader's queue drops meanwhile.
    match tokio::time::timeout(Duration::from_secs(5), stdin.write_all(buf)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(RunEnd::Died(format!("ffmpeg's input: {e}"))),
        Err(_) => Some(RunEnd::Died("ffmpeg stopped reading its input".into())),
    }
}

/// The source as ffmpeg reads it: fragmented MP4 from the project's muxer, the init segment
/// then one fragment per frame, at the hub's millisecond timescale. FLV would carry H.264 and
/// AAC, but Debian's ffmpeg (5.1) reads no HEVC or AV1 in FLV; MP4 it reads for every codec
/// the hub carries.
struct Mp4Feed {
    sequence: u32,
    /// A video frame's duration in ms, as the frame rate says (the next fragment's tfdt is what
    /// ffmpeg times the frame after it by, whatever this is).
    video_ms: u32,
    /// An AAC frame's: 1024 samples.
    audio_ms: u32,
}

/// fMP4 track ids start at 1; the hub's at 0.
fn mp4_track_id(wire: u8) -> u32 {
    u32::from(wire) + 1
}

impl Mp4Feed {
    fn start(init: &InitConfig, out: &mut Vec<u8>) -> Result<Self, String> {
        let (mut video_ms, mut audio_ms) = (33, 23);
        let mut tracks = Vec::new();
        for t in &init.tracks {
            let codec = match t.params {
                TrackParams::Video {
                    width,
                    height,
                    fps_milli,
                } => {
                    if let Some(ms) = 1_000_000u32.checked_div(fps_milli) {
                        video_ms = ms.max(1);
                    }
                    fmp4::Codec::video(&t.codec, width, height, &t.config)
                        .ok_or_else(|| format!("no MP4 sample entry for {}", t.codec))?
                }
                TrackParams::Audio {
                    sample_rate,
                    channels,
                } => {
                    if let Some(ms) = 1_024_000u32.checked_div(sample_rate) {
                        audio_ms = ms.max(1);
                    }
                    fmp4::Codec::Aac {
                        sample_rate,
                        channels,
                        asc: &t.config,
                    }
                }
            };
            tracks.push(fmp4::Track {
                id: mp4_track_id(t.id),
                timescale: t.timescale,
                codec,
            });
        }
        out.extend(fmp4::init_segment(&tracks).map_err(|e| format!("init segment: {e}"))?);
        Ok(Self {
            sequence: 0,
            video_ms,
            audio_ms,
        })
    }

    /// Appends one frame as a fragment; a frame too big for one is left out (and said).
    fn frame(&mut self, f: &crate::hub::Frame, out: &mut Vec<u8>) {
        let Ok(size) = u32::try_from(f.payload.len()) else {
            return;
        };
        self.sequence = self.sequence.wrapping_add(1);
        let sample = fmp4::Sample {
            duration: if f.is_video() {
                self.video_ms
            } else {
                self.audio_ms
            },
            size,
            cts: i32::from(f.header.cts),
            keyframe: f.header.keyframe,
        };
        let run = fmp4::Run {
            track_id: mp4_track_id(f.header.track),
            base_dts: f.header.dts,
            samples: std::slice::from_ref(&sample),
        };
        match fmp4::write_fragment_header(out, self.sequence, std::slice::from_ref(&run)) {
            Ok(()) => out.extend_from_slice(&f.payload),
            Err(e) => tracing::warn!(error = %e, "a frame left out of the ladder's input"),
        }
    }
}

/// Reads one rung's FLV back into its rendition until the socket ends; returns why.
async fn read_rung(
    mut conn: tokio::net::UnixStream,
    mut ingest: MediaIngest<crate::hub::RenditionWriter>,
) -> String {
    ingest.expect_video();
    let mut flv = TagReader::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) => return "ended".into(),
            Ok(n) => n,
            Err(e) => return e.to_string(),
        };
        flv.push(&buf[..n]);
        loop {
            let tag = match flv.next_tag() {
                Ok(Some(t)) => t,
                Ok(None) => break,
                Err(e) => return format!("FLV: {e}"),
            };
            let r = match tag.kind {
                8 => ingest.flv_audio(&tag.body, tag.timestamp),
                9 => ingest.flv_video(&tag.body, tag.timestamp),
                _ => Ok(()),
            };
            if let Err(e) = r {
                return e.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_splits_scales_and_keeps_the_sources_keyframes() {
        let rungs = [
            Rung {
                name: "480p".into(),
                height: 480,
                video_kbps: 1000,
                fps: None,
            },
            Rung {
                name: "240p".into(),
                height: 240,
                video_kbps: 300,
                fps: Some(15.0),
            },
        ];
        let sockets = [PathBuf::from("/d/0.sock"), PathBuf::from("/d/1.sock")];
        let args = ffmpeg_args(&rungs, &sockets).join(" ");
        assert!(
            args.contains("[0:v]split=2[s0][s1];[s0]scale=-2:480[o0];[s1]scale=-2:240,fps=15[o1]"),
            "{args}"
        );
        assert_eq!(args.matches("-force_key_frames source").count(), 2);
        assert!(args.contains("-copyts"));
        assert_eq!(args.matches("-udu_sei 1").count(), 2);
        assert!(args.contains("-b:v 300k -maxrate 300k -bufsize 600k"));
        assert!(args.ends_with("-f flv -flvflags no_duration_filesize unix:/d/1.sock"));
    }
}
