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

type Pusher =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn pusher(server: &Server, path: &str) -> Pusher {
    let url = format!("ws://{}{path}", server.http);
    tokio_tungstenite::connect_async(&url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
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

/// Pushes `bytes` in odd chunks, paced at about 30 frames a second, while a viewer records.
async fn push_and_watch(query: &str, aud: bool) {
    let bytes = camera_bytes(4, aud).await;
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
    let clock = if query.contains("fps=") {
        "configured fps"
    } else {
        "SPS VUI timing"
    };
    assert_eq!(api["publisher"]["clock"], clock, "{api}");
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
    // One frame apart at 30 fps (ms timestamps: 33 or 34).
    for w in rec.video_frames.windows(2) {
        let step = w[1].0 - w[0].0;
        assert!((33..=34).contains(&step), "dts step {step}");
    }
    let keyframes = rec.video_frames.iter().filter(|f| f.2).count();
    assert_eq!(keyframes, 4, "an IDR every 30 frames");
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "ffmpeg: {errors}");
}

#[tokio::test]
async fn websocket_push_without_delimiters_and_a_configured_rate() {
    push_and_watch("?fps=30", false).await;
}

#[tokio::test]
async fn websocket_push_with_delimiters_and_the_sps_timing() {
    push_and_watch("", true).await;
}

#[tokio::test]
async fn bytes_that_are_not_h264_are_refused_with_a_reason() {
    let server = Server::start(&[]).await;
    let mut push = pusher(&server, "/ingest/noise").await;
    // Noise with no start code in it.
    let noise: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251 + 1) as u8).collect();
    for c in noise.chunks(64 << 10) {
        if push
            .send(tungstenite::Message::Binary(c.to_vec().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let close = loop {
        match tokio::time::timeout(T, futures_util::StreamExt::next(&mut push))
            .await
            .expect("closed in time")
        {
            Some(Ok(tungstenite::Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    let close = close.expect("a close frame with a reason");
    assert_eq!(u16::from(close.code), 1003);
    assert!(
        close.reason.contains("not an H.264 Annex B stream"),
        "{}",
        close.reason
    );
    server.wait_log("raw H.264 refused", T).await;
    // The name is free again: nothing was left behind.
    let mut again = Viewer::connect(&server.ws_url("noise")).await;
    let first = again.recv(T).await;
    assert!(matches!(first.msg(), Message::Hello(_)));
}
