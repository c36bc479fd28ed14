//! Raw H.264 ingest (a camera's Annex B bytestream), with real ffmpeg as the camera: pushed over
//! the WebSocket in odd chunk sizes, played by a WebSocket viewer from its first IDR, decoded by
//! ffmpeg; and bytes that are not H.264 refused with a reason.

use std::time::Duration;

use futures_util::SinkExt;
use onair_protocol::wire::Message;
use onair_tests::{Recording, Server, Viewer, ffmpeg_decode_errors, require_tool};
use tokio_tungstenite::tungstenite;

const T: Duration = Duration::from_secs(20);

/// What ffmpeg writes as the camera: baseline H.264, a keyframe every 30 frames.
async fn camera_bytes(seconds: u32, aud: bool) -> Vec<u8> {
    require_tool("ffmpeg");
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-v", "error", "-f", "lavfi"])
        .args(["-i", "testsrc2=size=320x240:rate=30"])
        .args(["-t", &seconds.to_string()])
        .args(["-c:v", "libx264", "-profile:v", "baseline", "-g", "30"]);
    if aud {
        cmd.args(["-x264-params", "aud=1"]);
    }
    let out = cmd
        .args(["-bsf:v", "h264_mp4toannexb", "-f", "h264", "-"])
        .output()
        .await
        .expect("run ffmpeg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if aud {
        assert_eq!(
            out.stdout[4] & 0x1f,
            9,
            "starts with an access unit delimiter"
        );
    }
    out.stdout
}

/// Takes the VUI timing info out of every SPS (x264 always writes it; raspivid's cameras do not):
/// `timing_info_present_flag` to 0, and its 65 bits of fields dropped. Where the flag is comes
/// from ffmpeg's `trace_headers`, as a bit offset in the NAL unit's RBSP.
async fn strip_vui_timing(stream: &[u8]) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("onair-vui-{}.h264", std::process::id()));
    std::fs::write(&path, stream).expect("write");
    let trace = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "trace", "-i"])
        .arg(&path)
        .args(["-c", "copy", "-bsf:v", "trace_headers", "-f", "null", "-"])
        .output()
        .await
        .expect("ffmpeg trace_headers");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&trace.stderr);
    let at: usize = text
        .lines()
        .find(|l| l.contains("timing_info_present_flag"))
        .and_then(|l| l.split(']').nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the timing flag's offset");
    let mut out = Vec::new();
    let starts: Vec<usize> = (0..stream.len().saturating_sub(3))
        .filter(|&k| stream[k..k + 3] == [0, 0, 1])
        .collect();
    for (n, &s) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(stream.len(), |&e| e);
        let mut nal = stream[s + 3..end].to_vec();
        while nal.last() == Some(&0) {
            nal.pop(); // the next start code's leading zero
        }
        if nal[0] & 0x1f == 7 {
            nal = sps_without_timing(&nal, at);
        }
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&nal);
    }
    out
}

fn sps_without_timing(nal: &[u8], flag_bit: usize) -> Vec<u8> {
    // RBSP: without emulation prevention bytes.
    let mut rbsp = Vec::new();
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        rbsp.push(b);
    }
    let mut bits: Vec<bool> = rbsp
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
        .collect();
    // Drop the trailing stop bit and its padding, edit, then put them back.
    while bits.last() == Some(&false) {
        bits.pop();
    }
    bits.pop();
    assert!(bits[flag_bit], "timing_info_present_flag is set");
    bits[flag_bit] = false;
    bits.drain(flag_bit + 1..flag_bit + 1 + 65);
    bits.push(true);
    while !bits.len().is_multiple_of(8) {
        bits.push(false);
    }
    let bytes: Vec<u8> = bits
        .chunks(8)
        .map(|c| c.iter().fold(0u8, |acc, &b| acc << 1 | u8::from(b)))
        .collect();
    // Emulation prevention back in.
    let mut out = Vec::new();
    let mut zeros = 0;
    for b in bytes {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

type Pusher =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn pusher(server: &Server, path: &str) -> Pusher {
    let url = format!("ws://{}{path}", server.http);
    tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
}

/// The server's close frame, skipping anything before it; `what` names the case in a failure.
async fn close_frame(push: &mut Pusher, what: &str) -> Option<tungstenite::protocol::CloseFrame> {
    loop {
        match tokio::time::timeout(T, futures_util::StreamExt::next(push))
            .await
            .expect("closed in time")
        {
            Some(Ok(tungstenite::Message::Close(c))) => return c,
            Some(Ok(_)) => continue,
            other => panic!("{what}: no close frame: {other:?}"),
        }
    }
}

/// Chunk sizes from 1 to 5000 bytes, varied (a small LCG: the same every run).
fn odd_chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut seed: u32 = 12345;
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let n = (1 + (seed >> 8) % 5000) as usize;
        let end = (at + n).min(data.len());
        out.push(&data[at..end]);
        at = end;
    }
    out
}

/// Pushes the camera's bytes in odd chunks, paced at about 30 frames a second, while a viewer
/// records.
async fn push_and_watch(query: &str, aud: bool, timing: bool) {
    let mut bytes = camera_bytes(4, aud).await;
    if !timing {
        bytes = strip_vui_timing(&bytes).await;
    }
    let server = Server::start(&[]).await;
    let mut viewer = Viewer::connect(&server.ws_url("cam")).await;
    let mut push = pusher(&server, &format!("/ingest/cam{query}")).await;
    let chunks: Vec<Vec<u8>> = odd_chunks(&bytes).into_iter().map(<[u8]>::to_vec).collect();
    let per_chunk = Duration::from_secs(4).div_f64(chunks.len() as f64);
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(per_chunk);
        for c in chunks {
            tick.tick().await;
            push.send(tungstenite::Message::Binary(c.into()))
                .await
                .expect("push");
        }
        push.close(None).await.expect("close");
    });
    let mut rec = Recording::default();
    while rec.video_frames.len() < 30 {
        rec.push(&viewer.recv(T).await);
    }
    // While it is live, the API says where it comes from and which clock stamps it.
    let api = server.api("/api/streams/cam").await;
    assert_eq!(api["publisher"]["protocol"], "ws", "{api}");
    let clock = match (query.contains("fps="), timing) {
        (true, _) => "configured fps",
        (false, true) => "SPS VUI timing",
        (false, false) => "arrival time",
    };
    assert_eq!(api["publisher"]["clock"], clock, "{api}");
    if !timing {
        let fps = &api["video"]["fps"];
        assert!(
            query.contains("fps=") || fps.is_null(),
            "no timing in the SPS, no fps: {api}"
        );
    }
    // 4 s at 30 fps; the last frame leaves when the stream ends.
    while rec.video_frames.len() < 120 {
        rec.push(&viewer.recv(T).await);
    }
    sender.await.expect("sender");
    assert_eq!(
        rec.first_media_was_keyframe,
        Some(true),
        "starts on the IDR"
    );
    let info = rec.video.as_ref().expect("video init");
    assert_eq!((info.width, info.height), (320, 240));
    assert!(info.codec.starts_with("avc1.42"), "{}", info.codec);
    // One frame apart at 30 fps (ms timestamps: 33 or 34); by arrival, at least increasing.
    for w in rec.video_frames.windows(2) {
        let step = w[1].0 - w[0].0;
        if query.contains("fps=") || timing {
            assert!((33..=34).contains(&step), "dts step {step}");
        } else {
            assert!(step >= 1, "dts step {step}");
        }
    }
    let keyframes = rec.video_frames.iter().filter(|f| f.2).count();
    assert_eq!(keyframes, 4, "an IDR every 30 frames");
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
}

#[tokio::test]
async fn websocket_push_without_delimiters_or_sps_timing_at_a_configured_rate() {
    push_and_watch("?fps=30", false, false).await;
}

#[tokio::test]
async fn websocket_push_with_delimiters_and_the_sps_timing() {
    push_and_watch("", true, true).await;
}

#[tokio::test]
async fn websocket_push_without_any_rate_is_stamped_by_arrival() {
    push_and_watch("", false, false).await;
}

/// Three kinds of bytes that are not H.264, megabytes of each.
fn noises() -> Vec<(&'static str, Vec<u8>)> {
    const LEN: usize = 4 << 20;
    // No zero byte at all, so no start code anywhere.
    let plain: Vec<u8> = (0..LEN).map(|i| (i % 251 + 1) as u8).collect();
    // Pseudo-random bytes (a fixed LCG): zeros, but almost never a start code.
    let mut seed: u32 = 7;
    let random: Vec<u8> = (0..LEN)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 16) as u8
        })
        .collect();
    // A start code and a NAL unit header, then `00 00 00 02` (no start code): from there the
    // Annex B reader rejects every byte.
    let mut after_a_start = vec![0, 0, 0, 1, 0x09, 0xf0, 0, 0, 0, 2];
    after_a_start.extend((0..LEN).map(|i| (i % 250 + 2) as u8));
    vec![
        ("plain", plain),
        ("random", random),
        ("after-a-start", after_a_start),
    ]
}

/// The refusal is decided from the bytes, not by a clock: with the IDR deadline at ten minutes,
/// every kind of noise is closed with 1003 in seconds, and megabytes of it leave a handful of
/// log lines (h264-reader's reader would write one per rejected byte).
#[tokio::test]
async fn bytes_that_are_not_h264_are_refused_with_a_reason() {
    let server = Server::start_with_env(&[], &[("ONAIR_INGEST_IDR_TIMEOUT_MS", "600000")]).await;
    for (kind, noise) in noises() {
        let path = format!("/ingest/noise-{kind}");
        let log_before = server.log_lines();
        let mut push = pusher(&server, &path).await;
        let started = std::time::Instant::now();
        for c in noise.chunks(64 << 10) {
            if push
                .send(tungstenite::Message::Binary(c.to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let close = close_frame(&mut push, kind).await;
        let took = started.elapsed();
        let close = close.expect("a close frame with a reason");
        assert_eq!(u16::from(close.code), 1003, "{kind}: {}", close.reason);
        assert!(
            close.reason.contains("not an H.264 Annex B stream"),
            "{kind}: {}",
            close.reason
        );
        assert!(
            took < Duration::from_secs(20),
            "{kind}: refused after {took:?}"
        );
        server
            .wait_log_since(log_before, "raw H.264 refused", T)
            .await;
        // The name is free again: nothing was left behind.
        let mut again = Viewer::connect(&server.ws_url(&format!("noise-{kind}"))).await;
        let first = again.recv(T).await;
        assert!(matches!(first.msg(), Message::Hello(_)));
        let lines = server.log_lines() - log_before;
        assert!(
            lines <= 8,
            "{kind}: {lines} log lines for {} MB of noise:\n{}",
            noise.len() >> 20,
            server.log_tail(lines)
        );
        eprintln!("{kind}: 1003 after {took:?}, {lines} log lines");
    }
}

/// The TCP listener refuses noise the same way: from the bytes, with one log line.
#[tokio::test]
async fn noise_on_a_tcp_listener_is_refused_from_the_bytes() {
    use tokio::io::AsyncWriteExt;
    let port = onair_tests::free_port().expect("port");
    let config = config_file(
        "noise-listen",
        &format!("[[listen]]\nname = \"tcpnoise\"\naddr = \"127.0.0.1:{port}\"\n"),
    );
    let server = Server::start_with_env(
        &["--config", &config],
        &[("ONAIR_INGEST_IDR_TIMEOUT_MS", "600000")],
    )
    .await;
    for (kind, noise) in noises() {
        let log_before = server.log_lines();
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        for c in noise.chunks(64 << 10) {
            if tcp.write_all(c).await.is_err() {
                break; // the server closed: it has decided
            }
        }
        let line = server
            .wait_log_since(log_before, "tcp source refused or failed", T)
            .await;
        let took = started.elapsed();
        assert!(
            line.contains("not an H.264 Annex B stream"),
            "{kind}: {line}"
        );
        assert!(
            took < Duration::from_secs(20),
            "{kind}: refused after {took:?}"
        );
        let lines = server.log_lines() - log_before;
        assert!(
            lines <= 8,
            "{kind}: {lines} log lines:\n{}",
            server.log_tail(lines)
        );
    }
}

/// A config file for the server under test.
fn config_file(name: &str, toml: &str) -> String {
    let dir = onair_tests::browser::artifacts_dir().join(format!("raw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    path.to_string_lossy().to_string()
}

/// ffmpeg as a live camera (30 fps baseline, an IDR every 30 frames) sending to `target`, in
/// `format`: `h264` (Annex B) or `flv` (with AAC).
fn live_camera(target: &str, format: &str) -> tokio::process::Child {
    require_tool("ffmpeg");
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args([
        "-hide_banner",
        "-v",
        "error",
        "-nostdin",
        "-re",
        "-f",
        "lavfi",
    ])
    .args(["-i", "testsrc2=size=320x240:rate=30"]);
    if format == "flv" {
        cmd.args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]);
    }
    cmd.args(["-c:v", "libx264", "-profile:v", "baseline", "-g", "30"]);
    if format == "flv" {
        cmd.args(["-c:a", "aac", "-f", "flv"]);
    } else {
        cmd.args(["-bsf:v", "h264_mp4toannexb", "-f", "h264"]);
    }
    cmd.arg(target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg")
}

/// A camera that listens on `port`, as `raspivid -l` does.
fn listening_camera(port: u16, format: &str) -> tokio::process::Child {
    live_camera(&format!("tcp://127.0.0.1:{port}?listen=1"), format)
}

/// Receives until `frames` video frames after the latest init, which must start on a keyframe.
async fn watch_frames(viewer: &mut Viewer, frames: usize) -> Recording {
    let mut rec = Recording::default();
    while rec.video_frames.len() < frames {
        rec.push(&viewer.recv(T).await);
    }
    rec
}

#[tokio::test]
async fn tcp_pull_plays_and_reconnects_when_the_camera_comes_back() {
    let port = onair_tests::free_port().expect("a free port");
    let config = config_file(
        "pull",
        &format!("[[pull]]\nname = \"cam1\"\nurl = \"tcp://127.0.0.1:{port}\"\n"),
    );
    let server = Server::start(&["--config", &config]).await;
    let mut viewer = Viewer::connect(&server.ws_url("cam1")).await;
    let camera = listening_camera(port, "h264");
    let rec = watch_frames(&mut viewer, 60).await;
    assert_eq!(rec.first_media_was_keyframe, Some(true));
    let info = rec.video.as_ref().expect("init");
    assert_eq!((info.width, info.height), (320, 240));
    for w in rec.video_frames.windows(2) {
        let step = w[1].0 - w[0].0;
        assert!((33..=34).contains(&step), "dts step {step}");
    }
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
    let api = server.api("/api/streams/cam1").await;
    assert_eq!(api["publisher"]["protocol"], "tcp", "{api}");

    // The camera drops and comes back: the viewer stays, and resumes from the next IDR.
    drop(camera);
    viewer
        .recv_until(T, |m| {
            matches!(m, Message::Status(s) if s.code == onair_protocol::wire::StatusCode::Waiting)
        })
        .await;
    server
        .wait_log("camera disconnected; reconnecting", T)
        .await;
    let _camera = listening_camera(port, "h264");
    let mut rec = Recording {
        hello: true, // same connection
        ..Recording::default()
    };
    while rec.video_frames.len() < 30 {
        rec.push(&viewer.recv(T).await);
    }
    assert_eq!(
        rec.first_media_was_keyframe,
        Some(true),
        "resumes on an IDR"
    );
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "ffmpeg after the reconnect: {errors}");
}

#[tokio::test]
async fn tcp_pull_takes_flv_too_and_the_push_listener_takes_h264() {
    let (flv_port, push_port) = (
        onair_tests::free_port().expect("a free port"),
        onair_tests::free_port().expect("a free port"),
    );
    let config = config_file(
        "flv-listen",
        &format!(
            "[[pull]]\nname = \"flvcam\"\nurl = \"tcp://127.0.0.1:{flv_port}\"\n\n\
             [[listen]]\nname = \"pushed\"\naddr = \"127.0.0.1:{push_port}\"\nfps = 30\n"
        ),
    );
    let server = Server::start(&["--config", &config]).await;
    // FLV, told apart by its first bytes: audio comes along.
    let mut viewer = Viewer::connect(&server.ws_url("flvcam")).await;
    let _flv = listening_camera(flv_port, "flv");
    let mut rec = watch_frames(&mut viewer, 30).await;
    while rec.audio_frames.len() < 20 {
        rec.push(&viewer.recv(T).await);
    }
    assert!(rec.audio.is_some(), "the FLV's AAC track");
    assert_eq!(rec.first_media_was_keyframe, Some(true));

    // A source pushing raw H.264 to the listening port becomes stream "pushed".
    let mut viewer = Viewer::connect(&server.ws_url("pushed")).await;
    let mut pusher = live_camera(&format!("tcp://127.0.0.1:{push_port}"), "h264");
    let rec = watch_frames(&mut viewer, 30).await;
    assert_eq!(rec.first_media_was_keyframe, Some(true));
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
    let api = server.api("/api/streams/pushed").await;
    assert_eq!(api["publisher"]["clock"], "configured fps", "{api}");
    let _ = pusher.kill().await;
}

#[tokio::test]
async fn a_stream_without_idr_is_refused_and_another_stream_loses_nothing() {
    let server = Server::start_with_env(&[], &[("ONAIR_INGEST_IDR_TIMEOUT_MS", "2000")]).await;
    // A healthy stream, watched throughout.
    let _live =
        onair_tests::Publisher::start(&server.rtmp_url("healthy"), onair_tests::Profile::default());
    let mut watcher = Viewer::connect(&server.ws_url("healthy")).await;
    let mut rec = watch_frames(&mut watcher, 10).await;
    // The camera's stream with every IDR taken out: parameter sets and P slices only.
    let bytes = camera_bytes(4, false).await;
    let mut no_idr = Vec::new();
    let starts: Vec<usize> = (0..bytes.len().saturating_sub(3))
        .filter(|&k| bytes[k..k + 3] == [0, 0, 1])
        .collect();
    for (n, &s) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(bytes.len(), |&e| e);
        if bytes[s + 3] & 0x1f != 5 {
            no_idr.extend_from_slice(&[0, 0, 0, 1]);
            no_idr.extend_from_slice(&bytes[s + 3..end]);
        }
    }
    assert!(starts.len() > 100, "{} NAL units", starts.len());
    let mut push = pusher(&server, "/ingest/broken?fps=30").await;
    let started = std::time::Instant::now();
    let sender = tokio::spawn(async move {
        for c in no_idr.chunks(2000) {
            if push
                .send(tungstenite::Message::Binary(c.to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Read the close.
        loop {
            match tokio::time::timeout(T, futures_util::StreamExt::next(&mut push)).await {
                Ok(Some(Ok(tungstenite::Message::Close(c)))) => return c,
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    });
    // Meanwhile the healthy stream plays on, frame after frame.
    while started.elapsed() < Duration::from_secs(3) {
        rec.push(&watcher.recv(T).await);
    }
    let close = sender.await.expect("sender").expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(
        close.reason.contains("no IDR frame within 2 s"),
        "{}",
        close.reason
    );
    rec.assert_video_continuous(35);
}

/// A message that never ends (fragments without a final one) is read as it comes: noise in it
/// is refused after the first megabyte, as in whole messages, and the server holds no more of
/// it than a fragment.
#[tokio::test]
async fn a_fragmented_message_is_read_fragment_by_fragment() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = Server::start(&[]).await;
    let rss_before = server.rss_bytes();
    let mut push = pusher(&server, "/ingest/fragments").await;
    let zeros = vec![0u8; 256 << 10];
    let mut sent = 0usize;
    let mut kind = OpCode::Data(Data::Binary);
    // Up to 64 MiB, never with FIN: a reassembling server would hold it all and answer nothing.
    while sent < 64 << 20 {
        let frame = Frame::message(zeros.clone(), kind, false);
        if push.send(tungstenite::Message::Frame(frame)).await.is_err() {
            break;
        }
        sent += zeros.len();
        kind = OpCode::Data(Data::Continue);
    }
    let close = close_frame(&mut push, "fragments").await;
    let close = close.expect("a close frame with a reason");
    assert_eq!(u16::from(close.code), 1003, "{}", close.reason);
    assert!(
        close.reason.contains("without an H.264 start code"),
        "{}",
        close.reason
    );
    let grew = server.rss_bytes().saturating_sub(rss_before);
    assert!(grew < 16 << 20, "RSS grew by {} MiB", grew >> 20);
}
