//! The TS demuxer against real ffmpeg: 3-second x264 (with B-frames) and x265 clips with AAC,
//! muxed to MPEG-TS by ffmpeg as an SRT publisher sends them, demuxed in SRT-sized chunks, byte
//! by byte and in random chunks, clean and with garbage inserted. What comes out must be what
//! ffprobe reads from the same file.

use std::path::{Path, PathBuf};
use std::process::Command;

use onair_protocol::codec::aac::split_adts;
use onair_protocol::ts::{PACKET_SIZE, TsDemuxer, TsFrame, TsStats, TsStreamType};
use onair_tests::require_tool;
use onair_tests::{TempDir, run_ok};
use serde_json::Value;

const GARBAGE: usize = 1000;
/// 48 kHz: an AAC frame is 1024 samples, exactly 1920 ticks at 90 kHz.
const AAC_FRAME_TICKS: u64 = 1024 * 90_000 / 48_000;

/// A 3-second MPEG-TS clip from Debian's ffmpeg: testsrc2 in `codec` with B-frames and a
/// keyframe a second, and a 48 kHz sine in AAC.
fn encode_ts(dir: &Path, codec: &str) -> PathBuf {
    let path = dir.join(format!("{codec}.ts"));
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-v", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", "3", "-c:v", codec, "-bf", "2", "-g", "30"])
        .args(["-pix_fmt", "yuv420p"]);
    if codec == "libx265" {
        cmd.args(["-x265-params", "log-level=error"]);
    }
    cmd.args(["-c:a", "aac", "-f", "mpegts"]).arg(&path);
    run_ok(&mut cmd);
    path
}

/// One packet as ffprobe reads it: pts, dts (90 kHz for TS), size, keyframe flag.
#[derive(Debug, PartialEq, Eq)]
struct Probed {
    pts: u64,
    dts: u64,
    size: usize,
    key: bool,
}

fn ffprobe(path: &Path, streams: &str) -> Vec<Probed> {
    let out = run_ok(
        Command::new("ffprobe")
            .args(["-v", "error", "-show_packets", "-select_streams", streams])
            .args(["-of", "json"])
            .arg(path),
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    let packets = json["packets"].as_array().expect("packets");
    packets
        .iter()
        .map(|p| Probed {
            pts: p["pts"].as_u64().expect("pts"),
            dts: p["dts"].as_u64().expect("dts"),
            size: p["size"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("size"),
            key: p["flags"].as_str().is_some_and(|f| f.starts_with('K')),
        })
        .collect()
}

/// The NAL unit types in an Annex B access unit.
fn nal_types(codec: TsStreamType, au: &[u8]) -> Vec<u8> {
    au.windows(4)
        .filter(|w| w[..3] == [0, 0, 1])
        .map(|w| match codec {
            TsStreamType::Hevc => (w[3] >> 1) & 0x3f,
            _ => w[3] & 0x1f,
        })
        .collect()
}

/// A keyframe: an IDR slice for H.264, an IRAP picture (BLA, IDR, CRA) for HEVC.
fn is_keyframe(codec: TsStreamType, au: &[u8]) -> bool {
    nal_types(codec, au).iter().any(|&t| match codec {
        TsStreamType::Hevc => (16..=23).contains(&t),
        _ => t == 5,
    })
}

/// Chunk sizes from a fixed-seed xorshift, 1 to 4000 bytes.
fn random_sizes() -> impl Iterator<Item = usize> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(1 + (x % 4000) as usize)
    })
}

fn demux(bytes: &[u8], sizes: impl Iterator<Item = usize>) -> (Vec<TsFrame>, TsStats) {
    let mut d = TsDemuxer::new();
    let mut out = Vec::new();
    let mut rest = bytes;
    for n in sizes {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        d.push(chunk, &mut out).expect("push");
        rest = tail;
    }
    d.finish(&mut out);
    (out, d.stats())
}

/// Demuxes `bytes` in SRT's 1316-byte messages, byte by byte and in random chunks, asserts all
/// three give the same, and returns it.
fn demux_every_way(bytes: &[u8]) -> (Vec<TsFrame>, TsStats) {
    let srt = demux(bytes, std::iter::repeat(7 * PACKET_SIZE));
    let bytewise = demux(bytes, std::iter::repeat(1));
    let random = demux(bytes, random_sizes());
    assert!(
        srt == bytewise,
        "byte by byte differs from 1316-byte chunks"
    );
    assert!(srt == random, "random chunks differ from 1316-byte chunks");
    srt
}

fn video(frames: &[TsFrame]) -> Vec<&TsFrame> {
    frames
        .iter()
        .filter(|f| f.stream != TsStreamType::Aac)
        .collect()
}

fn audio(frames: &[TsFrame]) -> Vec<&TsFrame> {
    frames
        .iter()
        .filter(|f| f.stream == TsStreamType::Aac)
        .collect()
}

/// The PID of the packet at `offset`.
fn pid_at(bytes: &[u8], offset: usize) -> u16 {
    (u16::from(bytes[offset + 1] & 0x1f) << 8) | u16::from(bytes[offset + 2])
}

/// A video packet in the middle of the clip that neither starts a PES nor is followed by one
/// starting on its PID: garbage in it or after it costs exactly one access unit.
fn mid_pes_video_packet(bytes: &[u8], video_pid: u16) -> usize {
    let packets = bytes.len() / PACKET_SIZE;
    let pusi = |i: usize| bytes[i * PACKET_SIZE + 1] & 0x40 != 0;
    (packets / 2..packets)
        .find(|&i| {
            pid_at(bytes, i * PACKET_SIZE) == video_pid
                && !pusi(i)
                && (i + 1..packets)
                    .find(|&j| pid_at(bytes, j * PACKET_SIZE) == video_pid)
                    .is_some_and(|j| !pusi(j))
        })
        .expect("a mid-PES video packet")
}

/// Garbage from a fixed-seed xorshift.
fn garbage() -> Vec<u8> {
    random_sizes().take(GARBAGE).map(|n| n as u8).collect()
}

fn check_clip(codec: &str, stream: TsStreamType) {
    require_tool("ffmpeg");
    require_tool("ffprobe");
    let dir = TempDir::new("ts", codec);
    let path = encode_ts(&dir.0, codec);
    let bytes = std::fs::read(&path).expect("read TS");
    assert_eq!(bytes.len() % PACKET_SIZE, 0);
    let probed_video = ffprobe(&path, "v");
    let probed_audio = ffprobe(&path, "a");

    let (frames, stats) = demux_every_way(&bytes);
    assert_eq!(
        stats,
        TsStats {
            packets: (bytes.len() / PACKET_SIZE) as u64,
            ..TsStats::default()
        },
        "a clean clip costs nothing"
    );

    // Video: every access unit with ffprobe's timestamps, sizes and keyframes.
    let v = video(&frames);
    assert_eq!(v.len(), probed_video.len(), "video frames");
    assert!(v.len() >= 85, "3 s at 30 fps: {}", v.len());
    for (i, (f, p)) in v.iter().zip(&probed_video).enumerate() {
        assert_eq!(f.stream, stream);
        assert_eq!((f.pts, f.dts), (p.pts, p.dts), "video frame {i}");
        // ffmpeg's HEVC parser, which ffprobe's packets come through, moves a zero byte from
        // one access unit to another; the total is checked below.
        if stream == TsStreamType::H264 {
            assert_eq!(f.data.len(), p.size, "video frame {i} size");
        }
        assert_eq!(
            is_keyframe(stream, &f.data),
            p.key,
            "video frame {i} keyframe"
        );
    }
    assert_eq!(
        v.iter().map(|f| f.data.len()).sum::<usize>(),
        probed_video.iter().map(|p| p.size).sum::<usize>(),
        "video bytes"
    );
    assert!(
        is_keyframe(stream, &v[0].data),
        "the first frame is a keyframe"
    );
    assert!(
        v.iter().any(|f| f.pts != f.dts),
        "B-frames: some pts differ from their dts"
    );

    // Audio: each PES is ADTS frames 1024 samples apart, one ffprobe packet each.
    let mut adts = Vec::new();
    for f in audio(&frames) {
        for (k, frame) in split_adts(&f.data).enumerate() {
            let (header, raw) = frame.expect("valid ADTS");
            assert_eq!(header.sample_rate(), 48_000);
            assert_eq!(header.audio_specific_config(), [0x11, 0x88], "AAC-LC mono");
            adts.push((f.pts + k as u64 * AAC_FRAME_TICKS, header.aac_frame_length));
            assert_eq!(raw.len(), header.aac_frame_length - 7);
        }
    }
    assert_eq!(adts.len(), probed_audio.len(), "ADTS frames");
    assert!(adts.len() >= 140, "3 s at 48 kHz: {}", adts.len());
    for (i, ((pts, size), p)) in adts.iter().zip(&probed_audio).enumerate() {
        assert_eq!((*pts, *size), (p.pts, p.size), "ADTS frame {i}");
    }

    // Garbage inside a video packet, and between two packets: the access unit of that packet
    // (of the one before, for garbage between packets, as the demuxer cannot tell the two
    // apart) is dropped, everything else comes out as from the clean clip.
    let video_pid = v[0].pid;
    let n = mid_pes_video_packet(&bytes, video_pid);
    for (what, at) in [
        ("inside a packet", n * PACKET_SIZE + 100),
        ("between packets", (n + 1) * PACKET_SIZE),
    ] {
        let mut damaged = bytes.clone();
        damaged.splice(at..at, garbage());
        let (got, stats) = demux_every_way(&damaged);
        assert_eq!(stats.resyncs, 1, "{what}");
        assert_eq!(stats.skipped_bytes, GARBAGE as u64, "{what}");
        assert_eq!(stats.continuity_errors, 0, "{what}");
        assert_eq!(stats.dropped_pes, 1, "{what}");
        assert_eq!(audio(&got), audio(&frames), "{what}: all audio");
        let got_video = video(&got);
        assert_eq!(got_video.len(), v.len() - 1, "{what}: one access unit lost");
        let lost = v
            .iter()
            .zip(&got_video)
            .position(|(a, b)| a != b)
            .unwrap_or(got_video.len());
        assert_eq!(got_video[..lost], v[..lost], "{what}");
        assert_eq!(got_video[lost..], v[lost + 1..], "{what}");
    }
}

#[test]
fn x264_with_b_frames_and_aac() {
    check_clip("libx264", TsStreamType::H264);
}

#[test]
fn x265_with_b_frames_and_aac() {
    check_clip("libx265", TsStreamType::Hevc);
}
