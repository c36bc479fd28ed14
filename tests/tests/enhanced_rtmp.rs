//! Enhanced RTMP multitrack from a current ffmpeg (9, from PyPI): the default video track is the
//! stream until extra video tracks become renditions, and of several audio tracks the default
//! one is the stream's. (HEVC, AV1 and VP9: tests/codecs.rs.)

use std::time::Duration;

use onair_protocol::wire::{Message, TrackParams};
use onair_tests::{Server, Viewer, ffmpeg9, start_of};

const T: Duration = Duration::from_secs(20);

fn publish(args: &[&str], url: &str) -> tokio::process::Child {
    tokio::process::Command::new(ffmpeg9())
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(args)
        .args(["-f", "flv", url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg 9")
}

/// The server said once that it left track 1 of `kind` out, and counted its packets (two
/// seconds of them at least, as the callers have played).
async fn second_track_left_out(server: &Server, kind: &str) {
    let line = server
        .wait_log(&format!("left out: {kind} track packets"), T)
        .await;
    assert!(line.contains("track=1"), "{line}");
    assert_eq!(
        server
            .log_matching(&format!("left out: {kind} track packets"))
            .len(),
        1,
        "said once"
    );
    let (_, metrics) = onair_tests::http_get(&server.http, "/metrics")
        .await
        .expect("GET /metrics");
    let sample = format!("onair_ingest_tracks_left_out_total{{kind=\"{kind}\"}}");
    let left_out = onair_tests::metric(&metrics, &sample).unwrap_or(0.0);
    assert!(
        left_out > 30.0,
        "the second track's packets counted: {left_out}"
    );
}

#[tokio::test]
async fn a_two_track_publish_makes_two_renditions() {
    let server = Server::start(&[]).await;
    // Two video tracks, as OBS's Enhanced Broadcasting sends them: ffmpeg writes the first as
    // a legacy tag and the second as an Enhanced RTMP multitrack (OneTrack) message.
    let mut ffmpeg = publish(
        &[
            "-filter_complex",
            "[0:v]split=2[a][b];[b]scale=320:180[c]",
            "-map",
            "[a]",
            "-map",
            "[c]",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-g",
            "30",
            "-c:a",
            "aac",
        ],
        &server.rtmp_url("two"),
    );
    let line = server
        .wait_log("multitrack: video track 1 is a rendition", T)
        .await;
    assert!(line.contains("rendition=\"180p\""), "{line}");
    let is_media = |m: &Message<'_>| matches!(m, Message::Media { .. });
    // A pinned viewer of each: keyframe first, at its own size, frames continuous.
    for (name, size) in [("source", (640, 360)), ("180p", (320, 180))] {
        let mut viewer =
            Viewer::connect(&format!("{}?rendition={name}", server.ws_url("two"))).await;
        let got = viewer.recv_until(T, is_media).await;
        let start = start_of(&got);
        assert_eq!(start.size, size, "{name}");
        assert!(start.keyframe_first, "{name}: keyframe first");
        assert!(
            start.audio,
            "{name}: the stream's audio goes with every track"
        );
        let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
        assert!(frames > 45, "{name}: {frames} frames in 2 s");
    }
    let (_, body) = onair_tests::http_get(&server.http, "/api/streams/two")
        .await
        .expect("GET /api/streams/two");
    let api: serde_json::Value = serde_json::from_str(&body).expect("json");
    let renditions: Vec<(String, u64)> = api["renditions"]
        .as_array()
        .expect("renditions")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["height"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        renditions,
        [("source".to_string(), 360), ("180p".to_string(), 180)],
        "the tracks are the renditions (no ladder beside them): {api}"
    );
    // Moved from one track to the other (the switch automatic choice makes too): the other's
    // init, then its frames from a keyframe, dts continuing.
    let mut viewer = Viewer::connect(&server.ws_url("two")).await;
    let got = viewer.recv_until(T, is_media).await;
    let at = start_of(&got).rendition;
    let last = got.iter().rev().find_map(|r| match r.msg() {
        Message::Media { header, .. } if header.track == 0 => Some(header.dts),
        _ => None,
    });
    let other = if at == 0 { 1 } else { 0 };
    viewer
        .send(&Message::Control(
            onair_protocol::wire::Control::SwitchRendition(other),
        ))
        .await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Init(i) if i.rendition == other))
        .await;
    let last = got
        .iter()
        .rev()
        .find_map(|r| match r.msg() {
            Message::Media { header, .. } if header.track == 0 => Some(header.dts),
            _ => None,
        })
        .or(last);
    let next = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let Message::Media { header, .. } = next.last().expect("video").msg() else {
        unreachable!("recv_until stops at video")
    };
    assert!(header.keyframe, "the switch lands on a keyframe");
    assert!(
        last.is_none_or(|l| header.dts > l),
        "no overlap: {} after {last:?}",
        header.dts
    );
    let last = Some(header.dts);
    assert!(viewer.continuous_video(Duration::from_secs(1), last).await > 20);
    assert!(
        ffmpeg.try_wait().expect("ffmpeg state").is_none(),
        "ffmpeg still publishing"
    );
}

#[tokio::test]
async fn a_two_audio_track_publish_plays_its_default_audio() {
    let server = Server::start(&[]).await;
    let mut ffmpeg = publish(
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=880:sample_rate=48000",
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-map",
            "2:a",
            "-c:v",
            "libx264",
            "-g",
            "30",
            "-c:a",
            "aac",
        ],
        &server.rtmp_url("two-audio"),
    );
    let mut viewer = Viewer::connect(&server.ws_url("two-audio")).await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    let audio = got.iter().find_map(|r| match r.msg() {
        Message::Init(init) => init.tracks.iter().find_map(|t| match t.params {
            TrackParams::Audio { sample_rate, .. } => Some((t.id, sample_rate)),
            _ => None,
        }),
        _ => None,
    });
    let (audio_id, rate) = audio.expect("an audio track in the init");
    assert_eq!(
        rate, 44100,
        "the first audio track, not the second (48 kHz)"
    );
    let from = std::time::Instant::now();
    let mut audio_frames = 0;
    while from.elapsed() < Duration::from_secs(2) {
        if let Message::Media { header, .. } = viewer.recv(T).await.msg()
            && header.track == audio_id
        {
            audio_frames += 1;
        }
    }
    // 44.1 kHz AAC: 43 frames a second, of the one track.
    assert!(
        (60..=110).contains(&audio_frames),
        "{audio_frames} audio frames in 2 s"
    );
    second_track_left_out(&server, "audio").await;
    assert!(
        ffmpeg.try_wait().expect("ffmpeg state").is_none(),
        "ffmpeg still publishing"
    );
}

/// AMF0 string value.
fn amf_string(out: &mut Vec<u8>, s: &str) {
    out.push(0x02);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One RTMP message in one type-0 chunk on chunk stream 3 (bodies here fit the default 128-byte
/// chunk size).
fn rtmp_message(kind: u8, stream_id: u32, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "one chunk at the default chunk size");
    let mut chunk = vec![0x03, 0, 0, 0];
    chunk.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    chunk.push(kind);
    chunk.extend_from_slice(&stream_id.to_le_bytes());
    chunk.extend_from_slice(body);
    chunk
}

/// An AMF0 command (`name`, transaction id, then `object` or null).
fn amf_command(name: &str, transaction: f64, object: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    amf_string(&mut body, name);
    body.push(0x00);
    body.extend_from_slice(&transaction.to_be_bytes());
    if object.is_empty() {
        body.push(0x05);
    } else {
        body.push(0x03);
        for (k, v) in object {
            body.extend_from_slice(&(k.len() as u16).to_be_bytes());
            body.extend_from_slice(k.as_bytes());
            amf_string(&mut body, v);
        }
        body.extend_from_slice(&[0, 0, 9]);
    }
    body
}

/// A raw RTMP client after the plain handshake (C0, C1; S0, S1, S2; C2 echoes S1) and a
/// `connect("live")`.
async fn rtmp_connected(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut c0c1 = vec![3u8];
    c0c1.extend(std::iter::repeat_n(0u8, 8));
    c0c1.extend((0..1528).map(|i| (i % 251) as u8));
    tcp.write_all(&c0c1).await.expect("C0 C1");
    let mut s = vec![0u8; 1 + 1536 + 1536];
    tcp.read_exact(&mut s).await.expect("S0 S1 S2");
    tcp.write_all(&s[1..1537]).await.expect("C2");
    let connect = amf_command(
        "connect",
        1.0,
        &[("app", "live"), ("tcUrl", "rtmp://127.0.0.1/live")],
    );
    tcp.write_all(&rtmp_message(20, 0, &connect))
        .await
        .expect("connect");
    tcp
}

/// Reads into `got` until it holds `needle`; fails on close or after `T`.
async fn read_until(tcp: &mut tokio::net::TcpStream, got: &mut Vec<u8>, needle: &[u8]) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + T;
    while !got.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {:?} in {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(got)
                )
            })
            .expect("read");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// The reply to `connect` advertises Enhanced RTMP Multitrack: `capsEx` = 2 among its
/// properties (what a multitrack encoder may look for before it sends several tracks).
#[tokio::test]
async fn the_connect_result_advertises_multitrack() {
    let server = Server::start(&[]).await;
    let mut tcp = rtmp_connected(&server.rtmp).await;
    let mut caps = b"\x00\x06capsEx\x00".to_vec();
    caps.extend_from_slice(&2.0f64.to_be_bytes());
    let mut got = Vec::new();
    read_until(&mut tcp, &mut got, &caps).await;
    assert!(
        got.windows(7).any(|w| w == b"_result"),
        "in the connect reply"
    );
}

/// A `@setDataFrame` without its metadata (which panicked rml_rtmp 0.8.0's session, see
/// third_party/rml_rtmp/ONAIR.md) is ignored: the same connection still gets its answer to
/// the next command.
#[tokio::test]
async fn a_short_set_data_frame_is_ignored() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start(&[]).await;
    let mut tcp = rtmp_connected(&server.rtmp).await;
    let mut got = Vec::new();
    read_until(&mut tcp, &mut got, b"NetConnection.Connect.Success").await;
    for values in [&["@setDataFrame"][..], &["@setDataFrame", "onMetaData"]] {
        let mut body = Vec::new();
        for v in values {
            amf_string(&mut body, v);
        }
        tcp.write_all(&rtmp_message(18, 1, &body))
            .await
            .expect("data");
    }
    let create = amf_command("createStream", 2.0, &[]);
    tcp.write_all(&rtmp_message(20, 0, &create))
        .await
        .expect("createStream");
    // createStream's `_result` carries transaction id 2.
    let mut answer = Vec::new();
    amf_string(&mut answer, "_result");
    answer.push(0x00);
    answer.extend_from_slice(&2.0f64.to_be_bytes());
    got.clear();
    read_until(&mut tcp, &mut got, &answer).await;
}
