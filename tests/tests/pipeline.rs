//! RTMP (real ffmpeg) → onair → WebSocket viewers (tokio-tungstenite), end to end.

use std::time::{Duration, SystemTime};

use onair_protocol::wire::{Message, StatusCode, TrackParams};
use onair_tests::{
    Next, Profile, Publisher, Recording, Server, Viewer, ffmpeg_decode_errors, unix_us,
};

const T: Duration = Duration::from_secs(10);

fn is_media(m: &Message<'_>) -> bool {
    matches!(m, Message::Media { .. })
}

/// Plays `frames` video frames and checks everything a player relies on.
async fn play_and_check(p: Profile) {
    let server = Server::start(&[]).await;
    // The viewer comes first: an unknown stream says "waiting" and keeps the viewer connected.
    let mut viewer = Viewer::connect(&server.ws_url("cam")).await;
    let mut rec = Recording::default();
    for r in viewer
        .recv_until(T, |m| matches!(m, Message::Status(_)))
        .await
    {
        rec.push(&r);
    }
    assert_eq!(rec.statuses, vec![StatusCode::Waiting]);

    let _publisher = Publisher::start(&server.rtmp_url("cam"), p);
    let want_video = 90usize;
    while rec.video_frames.len() < want_video {
        rec.push(&viewer.recv(T).await);
    }
    assert_eq!(rec.inits, 1);
    assert_eq!(rec.statuses, vec![StatusCode::Waiting, StatusCode::Live]);
    assert_eq!(
        rec.first_media_was_keyframe,
        Some(true),
        "first media is a keyframe"
    );
    let info = rec.video.as_ref().expect("video track");
    assert_eq!((info.width, info.height), (p.width, p.height));
    assert_eq!(rec.audio.is_some(), p.audio, "audio track iff published");

    // No gaps for a fast viewer: every frame, one frame interval apart (ms timescale).
    let frame_ms = 1000 / p.fps as u64;
    rec.assert_video_continuous(frame_ms + 2);
    if p.audio {
        assert!(
            rec.audio_frames.len() > 50,
            "audio arrived: {}",
            rec.audio_frames.len()
        );
        // 1024 samples at 44.1 kHz = 23.2 ms.
        rec.assert_audio_continuous(25);
    }
    let any_cts = rec.video_frames.iter().any(|f| f.1 != 0);
    assert_eq!(
        any_cts, !p.zerolatency,
        "B-frames (cts != 0) iff x264 defaults"
    );

    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(
        errors.is_empty(),
        "H.264 as received does not decode cleanly:\n{errors}"
    );
    if p.audio {
        let errors = ffmpeg_decode_errors("aac", &rec.adts).await;
        assert!(
            errors.is_empty(),
            "AAC as received does not decode cleanly:\n{errors}"
        );
    }
}

#[tokio::test]
async fn zerolatency_audio_video() {
    play_and_check(Profile::default()).await;
}

#[tokio::test]
async fn zerolatency_video_only() {
    play_and_check(Profile {
        audio: false,
        ..Profile::default()
    })
    .await;
}

#[tokio::test]
async fn bframes_audio_video() {
    play_and_check(Profile {
        zerolatency: false,
        ..Profile::default()
    })
    .await;
}

#[tokio::test]
async fn bframes_video_only() {
    play_and_check(Profile {
        zerolatency: false,
        audio: false,
        ..Profile::default()
    })
    .await;
}

/// 50 viewers join a running stream at once; each starts on a keyframe from the GOP cache,
/// without waiting for the next keyframe (the GOP here is 5 s long).
#[tokio::test]
async fn fifty_viewers_join_and_start_on_a_keyframe() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(
        &server.rtmp_url("crowd"),
        Profile {
            gop: 150,
            ..Profile::default()
        },
    );
    // Wait until the stream is live and a little into its first GOP.
    let mut probe = Viewer::connect(&server.ws_url("crowd")).await;
    probe.recv_until(T, is_media).await;
    for _ in 0..30 {
        probe.recv(T).await;
    }

    let url = server.ws_url("crowd");
    let joins = (0..50).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            let start = SystemTime::now();
            let mut v = Viewer::connect(&url).await;
            let mut rec = Recording::default();
            for r in v.recv_until(T, is_media).await {
                rec.push(&r);
            }
            let first = rec
                .video_frames
                .first()
                .copied()
                .expect("first media is video");
            let waited = first.4.duration_since(start).unwrap_or_default();
            (
                rec.first_media_was_keyframe,
                waited,
                first.3 < unix_us(start),
            )
        })
    });
    let results = futures_util::future::join_all(joins).await;
    let mut worst = Duration::ZERO;
    for r in results {
        let (keyframe_first, waited, from_cache) = r.expect("viewer task");
        assert_eq!(keyframe_first, Some(true));
        assert!(
            from_cache,
            "first frame came from the GOP cache, ingested before the join"
        );
        assert!(
            waited < Duration::from_secs(2),
            "time to first frame {waited:?}"
        );
        worst = worst.max(waited);
    }
    eprintln!(
        "50 joins: all keyframe-first from the GOP cache; slowest connect-to-first-frame {worst:?}"
    );
}

/// A viewer that stops reading must not hold back a fast one, and costs bounded memory.
#[tokio::test]
async fn stalled_viewer_does_not_hold_back_others() {
    let server = Server::start(&[
        "--stall-timeout-ms",
        "3000",
        "--max-backlog-bytes",
        "2097152",
    ])
    .await;
    let _publisher = Publisher::start(
        &server.rtmp_url("busy"),
        Profile {
            bitrate_kbps: Some(6000),
            ..Profile::default()
        },
    );
    let mut fast = Viewer::connect(&server.ws_url("busy")).await;
    let mut rec = Recording::default();
    for r in fast.recv_until(T, is_media).await {
        rec.push(&r);
    }

    // The stalled viewer: a raw socket that completes the upgrade and never reads again.
    let stalled = stalled_viewer(&server.http, "busy").await;
    let rss_before = server.rss_bytes();

    // While it sits there, the fast viewer keeps receiving every frame on time.
    let mut lateness = Vec::new();
    let stall_seen = async {
        server.wait_log("stalled", Duration::from_secs(30)).await;
    };
    tokio::pin!(stall_seen);
    let mut stall_logged = false;
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until || !stall_logged {
        tokio::select! {
            r = fast.recv(T) => {
                rec.push(&r);
                if let Message::Media { header, .. } = r.msg() {
                    lateness.push(unix_us(r.at).saturating_sub(header.ingest_us));
                }
            }
            _ = &mut stall_seen, if !stall_logged => stall_logged = true,
        }
    }
    let rss_after = server.rss_bytes();
    drop(stalled);

    rec.assert_video_continuous(35);
    lateness.sort_unstable();
    let p99 = lateness[lateness.len() * 99 / 100];
    assert!(p99 < 200_000, "fast viewer delivery latency p99 {p99} µs");
    // Backlog is bounded by max_backlog_bytes (2 MiB) in the shared log, not per viewer.
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "fast viewer: {} frames, delivery latency p50 {} µs p99 {p99} µs max {} µs; server RSS {} KiB -> {} KiB",
        lateness.len(),
        lateness[lateness.len() / 2],
        lateness[lateness.len() - 1],
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        growth < 16 << 20,
        "server RSS grew {growth} bytes while a viewer stalled"
    );
    let line = server.wait_log("viewer disconnected", T).await;
    assert!(line.contains("stalled"), "disconnect reason given: {line}");
}

async fn stalled_viewer(http: &str, stream: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = http.parse().expect("addr");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive window so the server's writes back up quickly.
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock.connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "GET /ws/{stream} HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("upgrade request");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("response");
    assert_eq!(&head, b"HTTP/1.1 101");
    s
}

/// The publisher dies and comes back at another resolution: the viewer stays, is told, and
/// gets the new init and then a keyframe.
#[tokio::test]
async fn republish_at_a_new_resolution() {
    let server = Server::start(&[]).await;
    let first = Publisher::start(&server.rtmp_url("re"), Profile::default());
    let mut viewer = Viewer::connect(&server.ws_url("re")).await;
    let mut rec = Recording::default();
    for r in viewer.recv_until(T, is_media).await {
        rec.push(&r);
    }
    assert_eq!(
        rec.video.as_ref().map(|v| (v.width, v.height)),
        Some((640, 360))
    );
    first.kill().await;

    let got = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Status(s) if s.code == StatusCode::Waiting),
        )
        .await;
    for r in &got {
        rec.push(r);
    }

    let _second = Publisher::start(
        &server.rtmp_url("re"),
        Profile {
            width: 320,
            height: 240,
            ..Profile::default()
        },
    );
    let mut seq = Vec::new();
    // The hello came before the first publisher; this recording covers the second one.
    let mut second = Recording {
        hello: true,
        ..Recording::default()
    };
    loop {
        let r = viewer.recv(T).await;
        match r.msg() {
            Message::Status(s) => seq.push(format!("status {:?}", s.code)),
            Message::Init(i) => {
                let dims = i.tracks.iter().find_map(|t| match t.params {
                    TrackParams::Video { width, height, .. } => Some((width, height)),
                    _ => None,
                });
                seq.push(format!("init {dims:?}"));
            }
            Message::Media { header, .. } => {
                seq.push(format!(
                    "media track={} key={}",
                    header.track, header.keyframe
                ));
            }
            _ => {}
        }
        second.push(&r);
        if second.video_frames.len() >= 45 {
            break;
        }
    }
    assert_eq!(
        &seq[..3],
        &[
            "status Republished",
            "init Some((320, 240))",
            "media track=0 key=true"
        ],
        "sequence after republish: {seq:?}"
    );
    second.assert_video_continuous(35);
    let errors = ffmpeg_decode_errors("h264", &second.h264).await;
    assert!(errors.is_empty(), "{errors}");
}

/// SIGTERM closes viewers with a close frame and a reason, and the server exits cleanly.
#[tokio::test]
async fn graceful_shutdown_closes_viewers() {
    let mut server = Server::start(&[]).await;
    let publisher = Publisher::start(&server.rtmp_url("bye"), Profile::default());
    let mut viewer = Viewer::connect(&server.ws_url("bye")).await;
    viewer.recv_until(T, is_media).await;
    let status = server.terminate().await;
    assert!(status.success(), "onair exit status {status}");
    let close = loop {
        match viewer.next(T).await {
            Next::Message(_) => continue,
            Next::Closed(c) => break c,
        }
    };
    assert_eq!(close, Some((1001, "server shutting down".to_string())));
    let (_, err) = publisher.wait_exit(T).await;
    let _ = err; // ffmpeg reports the closed connection its own way
}
