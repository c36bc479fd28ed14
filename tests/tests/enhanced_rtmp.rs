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

/// An RTMP publisher driven by rml_rtmp's client session: it connects, publishes `stream`,
/// sends `metadata` (with what ffmpeg cannot send, a `videoTrackIdInfoMap`), then the audio
/// and video tags of `flv` (a file a real encoder wrote) as they are. Returns the connection,
/// which must stay open for the stream to stay live.
async fn publish_flv(
    addr: &str,
    stream: &str,
    metadata: &rml_rtmp::sessions::StreamMetadata,
    flv: &[u8],
) -> tokio::net::TcpStream {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    use rml_rtmp::sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut handshake = Handshake::new(PeerType::Client);
    let p0p1 = handshake.generate_outbound_p0_and_p1().expect("C0 C1");
    tcp.write_all(&p0p1).await.expect("C0 C1");
    let mut buf = vec![0u8; 64 << 10];
    let left = loop {
        let n = tcp.read(&mut buf).await.expect("handshake");
        assert!(n > 0, "closed in the handshake");
        match handshake.process_bytes(&buf[..n]).expect("handshake") {
            HandshakeProcessResult::InProgress { response_bytes } => {
                tcp.write_all(&response_bytes).await.expect("handshake");
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                tcp.write_all(&response_bytes).await.expect("handshake");
                break remaining_bytes;
            }
        }
    };
    let (mut session, initial) = ClientSession::new(ClientSessionConfig::new()).expect("session");
    let mut out: Vec<u8> = Vec::new();
    let send = |r: ClientSessionResult, out: &mut Vec<u8>| {
        if let ClientSessionResult::OutboundResponse(p) = r {
            out.extend_from_slice(&p.bytes);
        }
    };
    for r in initial {
        send(r, &mut out);
    }
    send(
        session.request_connection("live".into()).expect("connect"),
        &mut out,
    );
    tcp.write_all(&std::mem::take(&mut out))
        .await
        .expect("connect");
    // Reads until the session raises `want`, answering what it asks to send meanwhile.
    async fn until(
        tcp: &mut tokio::net::TcpStream,
        session: &mut ClientSession,
        first: &[u8],
        want: fn(&ClientSessionEvent) -> bool,
    ) {
        let mut input = first.to_vec();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let mut out = Vec::new();
            let mut done = false;
            for r in session.handle_input(&input).expect("session input") {
                match r {
                    ClientSessionResult::OutboundResponse(p) => out.extend_from_slice(&p.bytes),
                    ClientSessionResult::RaisedEvent(e) => done |= want(&e),
                    _ => {}
                }
            }
            tcp.write_all(&out).await.expect("answer");
            if done {
                return;
            }
            let n = tokio::time::timeout(T, tcp.read(&mut buf))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(n > 0, "the server closed the connection");
            input = buf[..n].to_vec();
        }
    }
    until(&mut tcp, &mut session, &left, |e| {
        matches!(e, ClientSessionEvent::ConnectionRequestAccepted)
    })
    .await;
    send(
        session
            .request_publishing(stream.into(), PublishRequestType::Live)
            .expect("publish"),
        &mut out,
    );
    tcp.write_all(&std::mem::take(&mut out))
        .await
        .expect("publish");
    until(&mut tcp, &mut session, &[], |e| {
        matches!(e, ClientSessionEvent::PublishRequestAccepted)
    })
    .await;
    send(
        session.publish_metadata(metadata).expect("metadata"),
        &mut out,
    );
    // FLV: a 9-byte header and a 4-byte size, then tags (type, 24-bit size, 24+8-bit time,
    // stream id, body, 4-byte size).
    let mut at = 13;
    while at + 11 <= flv.len() {
        let kind = flv[at];
        let size = u32::from_be_bytes([0, flv[at + 1], flv[at + 2], flv[at + 3]]) as usize;
        let time = u32::from_be_bytes([flv[at + 7], flv[at + 4], flv[at + 5], flv[at + 6]]);
        let Some(body) = flv.get(at + 11..at + 11 + size) else {
            break;
        };
        let body = bytes::Bytes::copy_from_slice(body);
        let ts = rml_rtmp::time::RtmpTimestamp::new(time);
        match kind {
            8 => send(
                session.publish_audio_data(body, ts, false).expect("audio"),
                &mut out,
            ),
            9 => send(
                session.publish_video_data(body, ts, false).expect("video"),
                &mut out,
            ),
            _ => {} // ffmpeg's own onMetaData: this publisher sent its own
        }
        at += 11 + size + 4;
    }
    tcp.write_all(&out).await.expect("media");
    tcp
}

/// A multitrack publish whose metadata carries a `videoTrackIdInfoMap` (Enhanced RTMP v2):
/// the second track's rendition takes the name and the nominal bitrate the map gives it.
/// ffmpeg 9 writes the two tracks (to a file: it sends no such map itself).
#[tokio::test]
async fn a_track_is_named_and_rated_from_the_video_track_info_map() {
    let dir = onair_tests::TempDir::new("enhanced", "trackmap");
    let flv = dir.0.join("two-tracks.flv");
    let status = std::process::Command::new(ffmpeg9())
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args([
            "-t",
            "4",
            "-filter_complex",
            "[0:v]split=2[a][b];[b]scale=320:180[c]",
        ])
        .args(["-map", "[a]", "-map", "[c]", "-map", "1:a"])
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-c:a", "aac",
        ])
        .args(["-f", "flv"])
        .arg(&flv)
        .status()
        .expect("run ffmpeg 9");
    assert!(status.success(), "ffmpeg 9 wrote the FLV");
    let flv = std::fs::read(&flv).expect("read the FLV");

    let server = Server::start(&[]).await;
    let mut metadata = rml_rtmp::sessions::StreamMetadata::new();
    metadata.video_width = Some(640);
    metadata.video_height = Some(360);
    metadata.video_codec_id = Some(7);
    metadata.audio_codec_id = Some(10);
    let mut low = std::collections::HashMap::new();
    low.insert(
        "name".to_string(),
        rml_amf0::Amf0Value::Utf8String("low".into()),
    );
    low.insert(
        "videodatarate".to_string(),
        rml_amf0::Amf0Value::Number(300.0),
    );
    low.insert("height".to_string(), rml_amf0::Amf0Value::Number(180.0));
    metadata.video_track_id_info_map.insert("1".into(), low);
    let _publisher = publish_flv(&server.rtmp, "mapped", &metadata, &flv).await;

    // The API's renditions are the stats snapshot's (one a second): wait for both there.
    onair_tests::load::abr::wait_for_heights(&server, "mapped", &[360, 180])
        .await
        .expect("both tracks as renditions");
    let api = server.api("/api/streams/mapped").await;
    let renditions = api["renditions"].as_array().cloned().unwrap_or_default();
    let low = renditions
        .iter()
        .find(|r| r["name"] == "low")
        .unwrap_or_else(|| panic!("a rendition named from the map: {api}"));
    assert_eq!(low["height"], 180, "{low}");
    assert_eq!(low["nominal_kbps"], 300, "{low}");
    assert!(
        !renditions.iter().any(|r| r["name"] == "180p"),
        "named from the map, not by its height: {api}"
    );
    // Its viewers start on a keyframe of it.
    let mut viewer = Viewer::connect(&format!("{}?rendition=low", server.ws_url("mapped"))).await;
    let got = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let start = start_of(&got);
    assert_eq!(start.size, (320, 180));
    assert!(start.keyframe_first, "keyframe first");
}
