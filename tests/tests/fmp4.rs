//! The fMP4 muxer against real ffmpeg: x264 + AAC clips, with and without B-frames, read from FLV
//! (the form RTMP delivers), boxed the way the player boxes them (one sample per fragment) and the
//! way LL-HLS parts will be (several samples, both tracks in one moof). ffmpeg must decode every
//! frame without a word of complaint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use onair_protocol::codec::VideoCodec;
use onair_protocol::codec::aac::AudioSpecificConfig;
use onair_protocol::codec::avc::AvcInfo;
use onair_protocol::flv::{AudioTag, VideoTag, parse_audio, parse_video};
use onair_protocol::fmp4::{self, Codec, Run, Sample, Track};
use onair_tests::load::flv::{TAG_AUDIO, TAG_VIDEO, read_all};
use onair_tests::require_tool;
use onair_tests::{TempDir, run_ok};
use serde_json::Value;

const VIDEO_ID: u32 = 1;
const AUDIO_ID: u32 = 2;
/// FLV timestamps are milliseconds, and the player keeps them as they are.
const VIDEO_TIMESCALE: u32 = 1000;
const AAC_FRAME: u32 = 1024;
const CLIP_SECONDS: &str = "3";

struct Frame {
    dts_ms: u64,
    cts_ms: i32,
    keyframe: bool,
    data: Vec<u8>,
}

struct Clip {
    avcc: Vec<u8>,
    asc: Vec<u8>,
    width: u16,
    height: u16,
    sample_rate: u32,
    channels: u8,
    video: Vec<Frame>,
    audio: Vec<Frame>,
}

impl Clip {
    fn tracks(&self) -> [Track<'_>; 2] {
        [
            Track {
                id: VIDEO_ID,
                timescale: VIDEO_TIMESCALE,
                codec: Codec::Video {
                    codec: VideoCodec::Avc,
                    width: self.width,
                    height: self.height,
                    config: &self.avcc,
                },
            },
            Track {
                id: AUDIO_ID,
                timescale: self.sample_rate,
                codec: Codec::Aac {
                    sample_rate: self.sample_rate,
                    channels: self.channels,
                    asc: &self.asc,
                },
            },
        ]
    }

    /// Video sample `i`: its duration is the gap to the next frame, or the previous gap for the
    /// last one, as the player (which cannot wait for the next frame) will have to guess it.
    fn video_sample(&self, i: usize) -> Sample {
        let f = &self.video[i];
        let duration = match (self.video.get(i + 1), i.checked_sub(1)) {
            (Some(next), _) => next.dts_ms - f.dts_ms,
            (None, Some(prev)) => f.dts_ms - self.video[prev].dts_ms,
            (None, None) => 33,
        };
        Sample {
            duration: u32::try_from(duration).expect("duration fits u32"),
            size: u32::try_from(f.data.len()).expect("frame size fits u32"),
            cts: f.cts_ms,
            keyframe: f.keyframe,
        }
    }

    fn audio_sample(&self, i: usize) -> Sample {
        Sample {
            duration: AAC_FRAME,
            size: u32::try_from(self.audio[i].data.len()).expect("frame size fits u32"),
            cts: 0,
            keyframe: true,
        }
    }

    fn audio_dts(&self, i: usize) -> u64 {
        self.audio[i].dts_ms * u64::from(self.sample_rate) / 1000
    }
}

/// Encodes a test clip to FLV with real ffmpeg, as OBS or ffmpeg would publish it.
fn encode_flv(dir: &Path, zerolatency: bool) -> PathBuf {
    let path = dir.join("clip.flv");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-v", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440"])
        .args(["-t", CLIP_SECONDS, "-c:v", "libx264", "-g", "30"]);
    if zerolatency {
        cmd.args(["-tune", "zerolatency"]);
    }
    cmd.args(["-c:a", "aac", "-f", "flv"]).arg(&path);
    run_ok(&mut cmd);
    path
}

fn read_clip(path: &Path) -> Clip {
    let tags = read_all(&std::fs::read(path).expect("read FLV")).expect("valid FLV");
    let (mut avcc, mut asc) = (None, None);
    let (mut video, mut audio) = (Vec::new(), Vec::new());
    for tag in &tags {
        let dts_ms = u64::from(tag.ts);
        match tag.kind {
            TAG_VIDEO => match parse_video(&tag.body).expect("video tag") {
                VideoTag::SequenceHeader { config, .. } => avcc = Some(config.to_vec()),
                VideoTag::Frame {
                    keyframe,
                    cts,
                    data,
                    ..
                } => video.push(Frame {
                    dts_ms,
                    cts_ms: cts,
                    keyframe,
                    data: data.to_vec(),
                }),
                _ => {}
            },
            TAG_AUDIO => match parse_audio(&tag.body).expect("audio tag") {
                AudioTag::SequenceHeader { config, .. } => asc = Some(config.to_vec()),
                AudioTag::Frame { data, .. } => audio.push(Frame {
                    dts_ms,
                    cts_ms: 0,
                    keyframe: true,
                    data: data.to_vec(),
                }),
                // Debian's ffmpeg writes one legacy AAC track.
                AudioTag::Ignored | AudioTag::Multitrack(_) => {}
            },
            _ => {}
        }
    }
    let avcc = avcc.expect("AVC sequence header");
    let asc = asc.expect("AAC sequence header");
    let info = AvcInfo::parse(&avcc).expect("valid avcC");
    let aac = AudioSpecificConfig::parse(&asc).expect("valid ASC");
    assert!(video.first().expect("video frames").keyframe);
    assert!(!audio.is_empty(), "audio frames");
    Clip {
        width: u16::try_from(info.width).expect("width fits u16"),
        height: u16::try_from(info.height).expect("height fits u16"),
        sample_rate: aac.sampling_frequency,
        channels: aac.channels(),
        avcc,
        asc,
        video,
        audio,
    }
}

/// Appends one fragment: its header, then every run's sample bytes in order.
fn push_fragment(out: &mut Vec<u8>, sequence: u32, runs: &[Run<'_>], payloads: &[&[u8]]) {
    let before = out.len();
    let header_len = fmp4::fragment_header_len(runs);
    fmp4::write_fragment_header(out, sequence, runs).expect("fragment header");
    assert_eq!(out.len() - before, header_len);
    for p in payloads {
        out.extend_from_slice(p);
    }
}

/// The player's way: each frame is its own fragment as it arrives, in dts order.
fn box_per_frame(clip: &Clip) -> Vec<u8> {
    let mut out = fmp4::init_segment(&clip.tracks()).expect("init segment");
    let (mut v, mut a, mut sequence) = (0, 0, 1);
    while v < clip.video.len() || a < clip.audio.len() {
        let video_next = match (clip.video.get(v), clip.audio.get(a)) {
            (Some(vf), Some(af)) => vf.dts_ms <= af.dts_ms,
            (vf, _) => vf.is_some(),
        };
        if video_next {
            let s = [clip.video_sample(v)];
            let run = Run {
                track_id: VIDEO_ID,
                base_dts: clip.video[v].dts_ms,
                samples: &s,
            };
            push_fragment(&mut out, sequence, &[run], &[&clip.video[v].data]);
            v += 1;
        } else {
            let s = [clip.audio_sample(a)];
            let run = Run {
                track_id: AUDIO_ID,
                base_dts: clip.audio_dts(a),
                samples: &s,
            };
            push_fragment(&mut out, sequence, &[run], &[&clip.audio[a].data]);
            a += 1;
        }
        sequence += 1;
    }
    out
}

/// The LL-HLS way: parts of `frames_per_part` video frames, each with the audio up to the part's
/// end, both tracks in one moof.
fn box_parts(clip: &Clip, frames_per_part: usize) -> Vec<u8> {
    let mut out = fmp4::init_segment(&clip.tracks()).expect("init segment");
    let mut a = 0;
    for (part, first) in (0..clip.video.len()).step_by(frames_per_part).enumerate() {
        let last = (first + frames_per_part).min(clip.video.len());
        let end_ms = clip.video.get(last).map_or(u64::MAX, |f| f.dts_ms);
        let a_first = a;
        while a < clip.audio.len() && clip.audio[a].dts_ms < end_ms {
            a += 1;
        }
        let video: Vec<Sample> = (first..last).map(|i| clip.video_sample(i)).collect();
        let audio: Vec<Sample> = (a_first..a).map(|i| clip.audio_sample(i)).collect();
        let mut runs = vec![Run {
            track_id: VIDEO_ID,
            base_dts: clip.video[first].dts_ms,
            samples: &video,
        }];
        if !audio.is_empty() {
            runs.push(Run {
                track_id: AUDIO_ID,
                base_dts: clip.audio_dts(a_first),
                samples: &audio,
            });
        }
        let payloads: Vec<&[u8]> = clip.video[first..last]
            .iter()
            .chain(&clip.audio[a_first..a])
            .map(|f| f.data.as_slice())
            .collect();
        push_fragment(&mut out, part as u32 + 1, &runs, &payloads);
    }
    assert_eq!(a, clip.audio.len(), "every audio frame boxed");
    out
}

fn ffprobe_json(file: &Path, args: &[&str]) -> Value {
    let out = run_ok(
        Command::new("ffprobe")
            .args(["-v", "error", "-of", "json"])
            .args(args)
            .arg(file),
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// Everything a viewer's decoder will ask of the file.
fn check_mp4(dir: &Path, name: &str, mp4: &[u8], clip: &Clip, b_frames: bool) {
    let file = dir.join(format!("{name}.mp4"));
    std::fs::write(&file, mp4).expect("write mp4");

    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i"])
        .arg(&file)
        .args(["-f", "null", "-"])
        .stdin(Stdio::null())
        .output()
        .expect("run ffmpeg");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{name}: ffmpeg decoding exited {} saying: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let streams = ffprobe_json(&file, &["-show_streams"]);
    let streams = streams["streams"].as_array().expect("streams");
    let video: Vec<_> = streams
        .iter()
        .filter(|s| s["codec_type"] == "video")
        .collect();
    let audio: Vec<_> = streams
        .iter()
        .filter(|s| s["codec_type"] == "audio")
        .collect();
    assert_eq!((video.len(), audio.len()), (1, 1), "{name}: {streams:?}");
    assert_eq!(video[0]["codec_name"], "h264", "{name}");
    assert_eq!(
        (&video[0]["width"], &video[0]["height"]),
        (&320.into(), &240.into())
    );
    assert_eq!(audio[0]["codec_name"], "aac", "{name}");
    assert_eq!(
        audio[0]["sample_rate"],
        clip.sample_rate.to_string(),
        "{name}"
    );

    let counted = ffprobe_json(
        &file,
        &[
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames",
        ],
    );
    let decoded: usize = counted["streams"][0]["nb_read_frames"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: nb_read_frames in {counted}"));
    assert_eq!(decoded, clip.video.len(), "{name}: decoded video frames");

    let packets = ffprobe_json(
        &file,
        &["-select_streams", "v:0", "-show_entries", "packet=pts,dts"],
    );
    let packets = packets["packets"].as_array().expect("packets");
    assert_eq!(packets.len(), clip.video.len(), "{name}: video packets");
    let reordered = packets.iter().any(|p| p["pts"] != p["dts"]);
    assert_eq!(reordered, b_frames, "{name}: some video pts != dts");
}

fn check_clip(zerolatency: bool) {
    require_tool("ffmpeg");
    require_tool("ffprobe");
    let name = if zerolatency {
        "zerolatency"
    } else {
        "bframes"
    };
    let dir = TempDir::new("fmp4", name);
    let clip = read_clip(&encode_flv(&dir.0, zerolatency));
    let b_frames = clip.video.iter().any(|f| f.cts_ms > 0);
    assert_eq!(
        b_frames, !zerolatency,
        "x264 uses B-frames unless zerolatency"
    );
    assert!(clip.video.len() >= 80, "{} video frames", clip.video.len());

    check_mp4(&dir.0, "per-frame", &box_per_frame(&clip), &clip, b_frames);
    check_mp4(&dir.0, "parts", &box_parts(&clip, 7), &clip, b_frames);
}

#[test]
fn zerolatency_x264_decodes_cleanly() {
    check_clip(true);
}

#[test]
fn b_frames_decode_cleanly_and_keep_their_order() {
    check_clip(false);
}
