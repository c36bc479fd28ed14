//! The benchmark's source, identical for every server under test:
//!
//! 1. ffmpeg encodes a clip once (720p30 H.264 + AAC, fixed GOP) into an FLV file;
//! 2. a pacer replays it in real time, looping, and stamps every video frame with an H.264 SEI
//!    (user data unregistered) carrying a sequence number and the wall clock at the moment the
//!    frame is handed to the publisher;
//! 3. a second ffmpeg reads that FLV stream from a pipe and publishes it over RTMP (`-c copy`).
//!
//! Viewers of any server find the SEI in what they receive, so latency (stamp → receipt) and
//! lost frames (gaps in the sequence) are measured the same way for onair and for peers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use onair_protocol::flv::{VideoTag, parse_video};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use super::flv::{self, TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO, Tag};
use crate::{BoxError, require_tool, unix_us};

/// What the clip is encoded as.
#[derive(Debug, Clone, Copy)]
pub struct ClipSpec {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Keyframe interval in frames (fixed: no scene-cut keyframes).
    pub gop: u32,
    pub video_kbps: u32,
    pub audio_kbps: u32,
    /// Clip length; it loops. 8 s holds whole video frames and whole 48 kHz AAC frames.
    pub seconds: u32,
}

impl Default for ClipSpec {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 720,
            fps: 30,
            gop: 60,
            video_kbps: 1000,
            audio_kbps: 64,
            seconds: 8,
        }
    }
}

/// The encoded clip, split into the tags sent once (metadata, sequence headers) and the media
/// tags that loop.
pub struct Clip {
    pub spec: ClipSpec,
    pub headers: Vec<Tag>,
    pub media: Vec<Tag>,
    pub duration_ms: u32,
    /// Media bytes per loop, for the stream's real bitrate.
    pub media_bytes: u64,
}

impl Clip {
    /// Encodes the clip into `dir` unless it is already there, then reads it.
    pub async fn prepare(dir: &Path, spec: ClipSpec) -> Result<Clip, BoxError> {
        require_tool("ffmpeg");
        std::fs::create_dir_all(dir)?;
        let s = spec;
        let path: PathBuf = dir.join(format!(
            "clip-{}x{}p{}-g{}-{}k-{}k-{}s.flv",
            s.width, s.height, s.fps, s.gop, s.video_kbps, s.audio_kbps, s.seconds
        ));
        if !path.exists() {
            let tmp = path.with_extension("tmp.flv");
            let out = Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
                .args(["-f", "lavfi", "-i"])
                .arg(format!(
                    "testsrc2=size={}x{}:rate={}",
                    s.width, s.height, s.fps
                ))
                .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
                .args(["-t", &s.seconds.to_string()])
                .args([
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast",
                ])
                .args(["-tune", "zerolatency", "-g", &s.gop.to_string()])
                .args(["-x264-params", "scenecut=0"])
                .args(["-b:v", &format!("{}k", s.video_kbps)])
                .args(["-maxrate", &format!("{}k", s.video_kbps)])
                .args(["-bufsize", &format!("{}k", s.video_kbps)])
                .args([
                    "-c:a",
                    "aac",
                    "-b:a",
                    &format!("{}k", s.audio_kbps),
                    "-ac",
                    "2",
                ])
                .args(["-f", "flv"])
                .arg(&tmp)
                .output()
                .await?;
            if !out.status.success() {
                return Err(format!(
                    "ffmpeg could not encode the clip: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            std::fs::rename(&tmp, &path)?;
        }
        let tags = flv::read_all(&std::fs::read(&path)?)?;
        Self::from_tags(spec, tags)
    }

    fn from_tags(spec: ClipSpec, tags: Vec<Tag>) -> Result<Clip, BoxError> {
        let mut headers = Vec::new();
        let mut media = Vec::new();
        let mut video_frames = 0u32;
        for t in tags {
            let is_header = match t.kind {
                TAG_SCRIPT => true,
                TAG_VIDEO => !matches!(parse_video(&t.body)?, VideoTag::Frame { .. }),
                // AAC packet type 0 is the AudioSpecificConfig.
                TAG_AUDIO => t.body.get(1) == Some(&0),
                _ => continue,
            };
            if is_header {
                headers.push(t);
            } else {
                video_frames += u32::from(t.kind == TAG_VIDEO);
                media.push(t);
            }
        }
        let duration_ms = video_frames * 1000 / spec.fps;
        // Audio the encoder padded past the video's end would overlap the next loop.
        media.retain(|t| t.ts < duration_ms);
        let first_is_key = media.iter().find(|t| t.kind == TAG_VIDEO).is_some_and(|t| {
            matches!(
                parse_video(&t.body),
                Ok(VideoTag::Frame { keyframe: true, .. })
            )
        });
        if video_frames == 0 || !first_is_key {
            return Err("the clip must start with a video keyframe".into());
        }
        let media_bytes = media.iter().map(|t| t.body.len() as u64).sum();
        Ok(Clip {
            spec,
            headers,
            media,
            duration_ms,
            media_bytes,
        })
    }

    /// The clip's media bitrate in kbit/s.
    pub fn kbps(&self) -> u64 {
        self.media_bytes * 8 / u64::from(self.duration_ms)
    }
}

/// Our SEI's UUID: 16 ASCII bytes, so the payload never needs emulation prevention.
pub const SEI_UUID: [u8; 16] = *b"onair-bench-sei1";
/// SEI NAL: header, payload type 5, size 48, UUID, 32 hex digits, rbsp trailing bits.
const SEI_LEN: usize = 3 + 16 + 32 + 1;

/// A frame's stamp: its sequence number in the published stream and when it was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub wall_us: u64,
}

fn sei_nal(stamp: Stamp) -> [u8; SEI_LEN] {
    let mut nal = [0u8; SEI_LEN];
    nal[..3].copy_from_slice(&[0x06, 0x05, 48]);
    nal[3..19].copy_from_slice(&SEI_UUID);
    let hex = format!("{:016x}{:016x}", stamp.seq, stamp.wall_us);
    nal[19..51].copy_from_slice(hex.as_bytes());
    nal[51] = 0x80;
    nal
}

/// Finds our stamp among the 4-byte length-prefixed NAL units of an access unit.
pub fn find_stamp(avcc: &[u8]) -> Option<Stamp> {
    let mut rest = avcc;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let nal = rest.get(4..4 + len)?;
        if len == SEI_LEN && nal[..3] == [0x06, 0x05, 48] && nal[3..19] == SEI_UUID {
            let hex = std::str::from_utf8(&nal[19..51]).ok()?;
            return Some(Stamp {
                seq: u64::from_str_radix(&hex[..16], 16).ok()?,
                wall_us: u64::from_str_radix(&hex[16..], 16).ok()?,
            });
        }
        // Our SEI goes first (after an AUD, if any); no need to look past the first slice.
        if nal.first().is_some_and(|h| matches!(h & 0x1f, 1 | 5)) {
            return None;
        }
        rest = &rest[4 + len..];
    }
    None
}

/// Inserts the stamp SEI into an FLV AVC video tag body (5-byte header, then NAL units).
fn stamp_video_tag(body: &[u8], stamp: Stamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4 + SEI_LEN);
    out.extend_from_slice(&body[..5]);
    let mut nals = &body[5..];
    // An access unit delimiter must stay first.
    if nals.len() > 4 && nals[4] & 0x1f == 9 {
        let len = u32::from_be_bytes([nals[0], nals[1], nals[2], nals[3]]) as usize;
        let aud = 4 + len.min(nals.len() - 4);
        out.extend_from_slice(&nals[..aud]);
        nals = &nals[aud..];
    }
    out.extend_from_slice(&(SEI_LEN as u32).to_be_bytes());
    out.extend_from_slice(&sei_nal(stamp));
    out.extend_from_slice(nals);
    out
}

/// Audio is handed over this much ahead of its time, so that the publishing ffmpeg, which
/// interleaves by timestamp, never holds a video frame waiting for the audio beside it.
const AUDIO_LEAD: Duration = Duration::from_millis(40);

/// A running publisher: the pacer task and the ffmpeg publishing over RTMP.
pub struct Feed {
    ffmpeg: Child,
    pacer: JoinHandle<Result<(), String>>,
    /// Video frames stamped so far.
    pub published: Arc<AtomicU64>,
}

impl Feed {
    /// Starts publishing `clip` to `rtmp_url`, looping until dropped.
    pub fn start(clip: Arc<Clip>, rtmp_url: &str) -> Result<Feed, BoxError> {
        require_tool("ffmpeg");
        let mut ffmpeg = Command::new("ffmpeg")
            .args(["-hide_banner", "-nostats", "-loglevel", "error"])
            .args(["-probesize", "65536", "-analyzeduration", "0"])
            .args(["-f", "flv", "-i", "pipe:0", "-c", "copy"])
            .args(["-flush_packets", "1", "-f", "flv", rtmp_url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = ffmpeg.stdin.take().ok_or("ffmpeg stdin")?;
        let mut stderr = ffmpeg.stderr.take().ok_or("ffmpeg stderr")?;
        let published = Arc::new(AtomicU64::new(0));
        let counter = published.clone();
        let pacer = tokio::spawn(async move {
            let r = pace(&clip, &mut stdin, &counter).await;
            let mut err = String::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), stderr.read_to_string(&mut err))
                    .await;
            r.map_err(|e| format!("publisher stopped: {e}; ffmpeg said: {}", err.trim()))
        });
        Ok(Feed {
            ffmpeg,
            pacer,
            published,
        })
    }

    /// An error if the publisher has stopped (it never stops by itself).
    pub async fn check(&mut self) -> Result<(), String> {
        if self.pacer.is_finished() {
            return match (&mut self.pacer).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err("publisher stopped".into()),
                Err(e) => Err(format!("publisher task: {e}")),
            };
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        self.pacer.abort();
        let _ = self.ffmpeg.kill().await;
    }
}

async fn pace(
    clip: &Clip,
    out: &mut tokio::process::ChildStdin,
    published: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = flv::stream_header(true, true).to_vec();
    for t in &clip.headers {
        flv::write_tag(&mut buf, t.kind, 0, &[&t.body]);
    }
    out.write_all(&buf).await?;
    // Send times: video on its timestamp, audio AUDIO_LEAD early.
    let mut order: Vec<(Duration, &Tag)> = clip
        .media
        .iter()
        .map(|t| {
            let at = Duration::from_millis(u64::from(t.ts));
            let at = if t.kind == TAG_AUDIO {
                at.saturating_sub(AUDIO_LEAD)
            } else {
                at
            };
            (at, t)
        })
        .collect();
    order.sort_by_key(|(at, _)| *at);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let period = Duration::from_millis(u64::from(clip.duration_ms));
    let mut seq = 0u64;
    for round in 0u32.. {
        let base = start + period * round;
        let ts_base = clip.duration_ms * round;
        for (at, t) in &order {
            tokio::time::sleep_until(base + *at).await;
            buf.clear();
            if t.kind == TAG_VIDEO {
                let stamp = Stamp {
                    seq,
                    wall_us: unix_us(std::time::SystemTime::now()),
                };
                seq += 1;
                let body = stamp_video_tag(&t.body, stamp);
                flv::write_tag(&mut buf, t.kind, ts_base + t.ts, &[&body]);
            } else {
                flv::write_tag(&mut buf, t.kind, ts_base + t.ts, &[&t.body]);
            }
            out.write_all(&buf).await?;
            if t.kind == TAG_VIDEO {
                published.store(seq, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips_through_a_video_tag() {
        // A keyframe tag: header, then an IDR slice NAL.
        let body = [0x17, 1, 0, 0, 0, 0, 0, 0, 3, 0x65, 0x88, 0x84];
        let stamp = Stamp {
            seq: 0x1234,
            wall_us: 1_700_000_000_123_456,
        };
        let tagged = stamp_video_tag(&body, stamp);
        assert_eq!(find_stamp(&tagged[5..]), Some(stamp));
        assert!(tagged.ends_with(&body[5..]), "the picture is untouched");
        assert!(
            !sei_nal(stamp).windows(2).any(|w| w == [0, 0]),
            "no emulation prevention needed"
        );
        assert_eq!(find_stamp(&body[5..]), None);
    }
}
