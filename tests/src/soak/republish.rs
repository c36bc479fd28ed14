//! R3: the publisher cut off in the middle of a frame, then republished, once at the same
//! resolution and once at another, while viewers watch.
//!
//! The publisher is the benchmark's (a pacer and `ffmpeg -c copy`), connected through a proxy
//! that, when told, forwards half of the next read that carries a frame, closes both sides,
//! and kills the ffmpeg: the server sees a message cut short and then the end of the
//! connection. Each viewer notes, for every publish after the one it joined, the first video
//! frame it got: its number in the new publish (from the stamp the pacer writes; 0 is the
//! publish's first keyframe), whether it was a keyframe, and its latency. One viewer also
//! writes every video frame it received as Annex B, which ffmpeg must decode without an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fastwebsockets::OpCode;
use onair_protocol::codec::avc::{AvcInfo, avcc_to_annexb};
use onair_protocol::wire::{Message, TrackParams};
use std::io::Write as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::unique;
use crate::load::STREAM;
use crate::load::source::{Clip, Feed, find_stamp};
use crate::load::viewers;
use crate::{BoxError, unix_us};

/// What one viewer saw of one publish after the one it joined.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Resumed {
    /// The first video frame's number in the new publish (0: its first keyframe).
    pub first_frame: u64,
    pub keyframe: bool,
    /// Of that first frame: publisher's stamp to receipt (the publishing ffmpeg's start-up
    /// included: it holds the frame until its RTMP session is up), and the server's ingest to
    /// receipt.
    pub latency_ms: f64,
    pub delivery_ms: f64,
    pub height: u16,
}

#[derive(Debug, Default)]
struct Viewer {
    error: Option<String>,
    resumed: Vec<Resumed>,
    frames: u64,
}

async fn watch(
    http: String,
    record: Option<PathBuf>,
    joined: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) -> Viewer {
    let mut v = Viewer::default();
    if let Err(e) = watch_inner(&http, record, &joined, &stop, &mut v).await {
        v.error = Some(e);
    }
    v
}

async fn watch_inner(
    http: &str,
    record: Option<PathBuf>,
    joined: &tokio::sync::Semaphore,
    stop: &CancellationToken,
    v: &mut Viewer,
) -> Result<(), String> {
    let mut ws = viewers::connect(http, &format!("/ws/{STREAM}"), None).await?;
    let mut out = match &record {
        Some(p) => Some(
            // A local file, written in page-sized pieces: blocking here costs nothing worth a
            // thread.
            std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
            ),
        ),
        None => None,
    };
    let mut inits = 0usize;
    let mut video: Option<(u8, AvcInfo, u16)> = None;
    let mut awaiting_first = false;
    let mut annexb = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            f = ws.read_frame() => f.map_err(|e| format!("read: {e}"))?,
        };
        match frame.opcode {
            OpCode::Binary => {}
            OpCode::Close => return Err("the server closed the connection".into()),
            _ => continue,
        }
        match Message::decode(&frame.payload).map_err(|e| e.to_string())? {
            Message::Init(init) => {
                inits += 1;
                for t in &init.tracks {
                    if let TrackParams::Video { height, .. } = t.params {
                        let info = AvcInfo::parse(t.config).map_err(|e| e.to_string())?;
                        video = Some((t.id, info, height));
                    }
                }
                awaiting_first = inits > 1;
            }
            Message::Media { header, payload } => {
                let Some((id, info, height)) = &video else {
                    continue;
                };
                if header.track != *id {
                    continue;
                }
                v.frames += 1;
                if v.frames == 1 {
                    joined.add_permits(1);
                }
                if awaiting_first {
                    awaiting_first = false;
                    let stamp = find_stamp(payload).ok_or("a video frame without its stamp")?;
                    let now = unix_us(SystemTime::now());
                    v.resumed.push(Resumed {
                        first_frame: stamp.seq,
                        keyframe: header.keyframe,
                        latency_ms: now.saturating_sub(stamp.wall_us) as f64 / 1000.0,
                        delivery_ms: now.saturating_sub(header.ingest_us) as f64 / 1000.0,
                        height: *height,
                    });
                }
                if let Some(f) = out.as_mut() {
                    // Each keyframe with the parameter sets in front: decodable from there,
                    // across a republish at another size.
                    annexb.clear();
                    avcc_to_annexb(
                        payload,
                        info.length_size,
                        header.keyframe.then_some(info),
                        &mut annexb,
                    )
                    .map_err(|e| e.to_string())?;
                    f.write_all(&annexb).map_err(|e| e.to_string())?;
                }
            }
            _ => {}
        }
    }
    if let Some(mut f) = out {
        f.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A one-connection proxy in front of the server's RTMP port that can cut its publisher off
/// in the middle of a frame.
struct CutProxy {
    addr: String,
    cut: CancellationToken,
    done: tokio::task::JoinHandle<Result<(usize, usize), String>>,
}

impl CutProxy {
    async fn start(upstream: String) -> Result<CutProxy, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let cut = CancellationToken::new();
        let c = cut.clone();
        let done = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut server = TcpStream::connect(&upstream)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sr, mut sw) = server.split();
            let (mut cr, mut cw) = client.split();
            let back = async {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            };
            let forth = async {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = cr.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("the publisher left before the cut".to_string());
                    }
                    // A read this long after the handshake is (part of) a video frame.
                    if c.is_cancelled() && n >= 1024 {
                        sw.write_all(&buf[..n / 2])
                            .await
                            .map_err(|e| e.to_string())?;
                        return Ok((n / 2, n));
                    }
                    sw.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
                }
            };
            tokio::select! {
                r = forth => r,
                _ = back => Err("the server closed the publisher's connection".into()),
            }
        });
        Ok(CutProxy { addr, cut, done })
    }

    /// Cuts the publisher off mid-frame; returns the bytes of the cut read that were sent.
    async fn cut(self, feed: Feed) -> Result<(usize, usize), BoxError> {
        self.cut.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.done).await??;
        // The proxy's sockets are closed; now the publisher dies too.
        feed.stop().await;
        Ok(r?)
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Cut {
    /// The resolution published after the cut.
    pub then: String,
    /// Of the cut read: bytes forwarded, of how many.
    pub cut_at: (usize, usize),
    /// Over the viewers: the latest first frame any resumed on, how many resumed on a
    /// keyframe, and the worst latency and delivery time of that first frame.
    pub first_frame_max: u64,
    pub on_keyframe: usize,
    pub latency_max_ms: f64,
    pub delivery_max_ms: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct R3 {
    pub viewers: usize,
    pub gop: u32,
    /// Viewers that lost their connection (or saw anything undecodable).
    pub failed: usize,
    pub errors: Vec<String>,
    /// Viewers that saw every republish.
    pub saw_all: usize,
    pub cuts: Vec<Cut>,
    /// The recording viewer's video, through ffmpeg: frames written and decoded, and what
    /// ffmpeg said on stderr.
    pub recorded_frames: u64,
    pub decoded_frames: u64,
    pub decode_errors: String,
}

/// Runs R3 with `viewers` viewers: `clip` published, cut, published again, cut, then `other`
/// (another resolution) published; each publish plays for `play`.
pub async fn r3(
    bin: &Path,
    clip: Arc<Clip>,
    other: Arc<Clip>,
    viewers: usize,
    play: Duration,
    work: &Path,
) -> Result<R3, BoxError> {
    crate::require_tool("ffmpeg");
    std::fs::create_dir_all(work)?;
    // Started without a publisher of its own: every publish here goes through a proxy.
    let config = super::Live::config_path("")?;
    let mut server =
        crate::Server::start_bin(bin, &["--config", &config], &[("ONAIR_LOG", "info")]).await;
    let rtmp_url = |addr: &str| format!("rtmp://{addr}/live/{STREAM}");

    let proxy = CutProxy::start(server.rtmp.clone()).await?;
    let feed = Feed::start(clip.clone(), &rtmp_url(&proxy.addr))?;
    let joined = Arc::new(tokio::sync::Semaphore::new(0));
    let stop = CancellationToken::new();
    let recording = work.join(format!("r3-viewer-{}.h264", unique()));
    let tasks: Vec<_> = (0..viewers)
        .map(|i| {
            tokio::spawn(watch(
                server.http.clone(),
                (i == 0).then(|| recording.clone()),
                joined.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let all = u32::try_from(viewers)?;
    tokio::time::timeout(Duration::from_secs(30), joined.acquire_many(all))
        .await
        .map_err(|_| "viewers did not all get a first frame")??
        .forget();
    tokio::time::sleep(play).await;

    let mut cuts = Vec::new();
    let cut_at = proxy.cut(feed).await?;
    let proxy = CutProxy::start(server.rtmp.clone()).await?;
    let feed = Feed::start(clip.clone(), &rtmp_url(&proxy.addr))?;
    cuts.push((format!("{}x{}", clip.spec.width, clip.spec.height), cut_at));
    tokio::time::sleep(play).await;
    let cut_at = proxy.cut(feed).await?;
    let mut feed = Feed::start(other.clone(), &server.rtmp_url(STREAM))?;
    cuts.push((
        format!("{}x{}", other.spec.width, other.spec.height),
        cut_at,
    ));
    tokio::time::sleep(play).await;
    feed.check().await?;
    stop.cancel();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await?);
    }
    feed.stop().await;
    let _ = server.terminate().await;

    let mut r = R3 {
        viewers,
        gop: clip.spec.gop,
        recorded_frames: seen.first().map_or(0, |v| v.frames),
        ..Default::default()
    };
    for (i, (then, cut_at)) in cuts.into_iter().enumerate() {
        let firsts: Vec<&Resumed> = seen.iter().filter_map(|v| v.resumed.get(i)).collect();
        r.cuts.push(Cut {
            then,
            cut_at,
            first_frame_max: firsts
                .iter()
                .map(|f| f.first_frame)
                .max()
                .unwrap_or(u64::MAX),
            on_keyframe: firsts.iter().filter(|f| f.keyframe).count(),
            latency_max_ms: firsts.iter().map(|f| f.latency_ms).fold(0.0, f64::max),
            delivery_max_ms: firsts.iter().map(|f| f.delivery_ms).fold(0.0, f64::max),
        });
    }
    for v in &seen {
        if let Some(e) = &v.error {
            r.failed += 1;
            if r.errors.len() < 3 {
                r.errors.push(e.clone());
            }
        }
        if v.resumed.len() >= r.cuts.len() {
            r.saw_all += 1;
        }
    }
    let (decoded, errors) = decode(&recording).await?;
    r.decoded_frames = decoded;
    r.decode_errors = errors;
    Ok(r)
}

/// Decodes an Annex B H.264 file with ffmpeg: frames decoded, and what ffmpeg said on stderr.
pub async fn decode(path: &Path) -> Result<(u64, String), BoxError> {
    let out = tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-nostdin",
            "-v",
            "error",
            "-f",
            "h264",
            "-i",
        ])
        .arg(path)
        .args(["-map", "0:v", "-f", "framecrc", "-"])
        .output()
        .await?;
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count() as u64;
    let mut errors = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() && errors.is_empty() {
        errors = format!("ffmpeg exited with {}", out.status);
    }
    Ok((frames, errors))
}
