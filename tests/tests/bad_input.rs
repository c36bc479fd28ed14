//! Bad input gets a clear error, and nothing else is lost: a live stream keeps every frame while
//! the server is fed garbage, truncated handshakes, absurd chunk sizes, bad paths, a second
//! publisher and a codec it cannot carry.

use std::time::Duration;

use onair_protocol::wire::Message;
use onair_tests::{Profile, Publisher, Recording, Server, Viewer, require_tool};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// Reads until the server closes the connection; fails if it stays open.
async fn expect_closed(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(T, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server kept the connection open");
}

async fn rtmp_handshake(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect rtmp");
    let mut hs = Handshake::new(PeerType::Client);
    s.write_all(&hs.generate_outbound_p0_and_p1().expect("p0p1"))
        .await
        .expect("write");
    let mut buf = vec![0u8; 8192];
    loop {
        let n = s.read(&mut buf).await.expect("read handshake");
        assert!(n > 0, "server closed during a valid handshake");
        match hs.process_bytes(&buf[..n]).expect("valid handshake") {
            HandshakeProcessResult::InProgress { response_bytes } => {
                s.write_all(&response_bytes).await.expect("write")
            }
            HandshakeProcessResult::Completed { response_bytes, .. } => {
                s.write_all(&response_bytes).await.expect("write");
                return s;
            }
        }
    }
}

/// One RTMP message as chunks of the default 128 bytes: a type 0 header, then type 3 headers.
fn chunked(csid: u8, type_id: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![csid, 0, 0, 0, len[1], len[2], len[3], type_id, 1, 0, 0, 0];
    for (i, c) in payload.chunks(128).enumerate() {
        if i > 0 {
            out.push(0xc0 | csid);
        }
        out.extend_from_slice(c);
    }
    out
}

fn ffmpeg(args: &[&str]) -> tokio::process::Child {
    require_tool("ffmpeg");
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg")
}

#[tokio::test]
async fn bad_input_is_refused_and_the_live_stream_loses_nothing() {
    let mut server = Server::start(&[]).await;
    let _live = Publisher::start(&server.rtmp_url("live1"), Profile::default());
    let mut viewer = Viewer::connect(&server.ws_url("live1")).await;
    let mut rec = Recording::default();
    for r in viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await
    {
        rec.push(&r);
    }

    // The viewer keeps reading in the background for the whole test.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        loop {
            tokio::select! {
                r = viewer.recv(T) => rec.push(&r),
                _ = &mut stop_rx => break,
            }
        }
        // One more second of frames after the last bad input.
        let until = rec.video_frames.len() + 30;
        while rec.video_frames.len() < until {
            rec.push(&viewer.recv(T).await);
        }
        rec
    });

    let bad_input_start = onair_tests::unix_us(std::time::SystemTime::now());

    // 1. Garbage on the RTMP port.
    let mut s = TcpStream::connect(&server.rtmp).await.expect("connect");
    s.write_all(&[0x47u8; 3000]).await.expect("write garbage");
    expect_closed(s).await;
    server.wait_log("not an RTMP client", T).await;

    // 2. A handshake cut short.
    let mut s = TcpStream::connect(&server.rtmp).await.expect("connect");
    let mut partial = vec![3u8];
    partial.extend_from_slice(&[0u8; 700]);
    s.write_all(&partial).await.expect("write");
    s.shutdown().await.expect("shutdown");
    expect_closed(s).await;
    server
        .wait_log("connection closed during the handshake after 701 bytes", T)
        .await;

    // 3. A chunk size beyond the spec's 2^31-1, right after a valid handshake.
    let mut s = rtmp_handshake(&server.rtmp).await;
    let mut chunk = vec![0x02, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0];
    chunk.extend_from_slice(&0x8000_0000u32.to_be_bytes());
    s.write_all(&chunk).await.expect("write chunk");
    expect_closed(s).await;
    server
        .wait_log("chunk size 2147483648 refused: must be 1..=16777215", T)
        .await;

    // 3b. A message started on another chunk stream before the first one finished (rml_rtmp's
    //     deserializer would panic on this: the chunk check refuses it before, with a reason).
    let mut s = rtmp_handshake(&server.rtmp).await;
    let mut bytes = chunked(3, 20, &[0x05; 300]);
    bytes.truncate(12 + 128);
    bytes.extend_from_slice(&chunked(4, 20, &[0x05; 10]));
    s.write_all(&bytes).await.expect("write interleaved");
    expect_closed(s).await;
    server.wait_log("malformed RTMP chunk stream", T).await;

    // 3c. An AMF0 command nested 5000 levels deep, which would overflow the stack of rml_amf0's
    //     recursive decoder and take the whole process down.
    let mut s = rtmp_handshake(&server.rtmp).await;
    let nested: Vec<u8> = std::iter::repeat_n([0x0a, 0, 0, 0, 1], 5000)
        .flatten()
        .collect();
    s.write_all(&chunked(3, 20, &nested))
        .await
        .expect("write nested amf");
    expect_closed(s).await;
    server
        .wait_log("AMF message refused: too deeply nested", T)
        .await;
    // None of it reached a panic (the hook would have printed it).
    assert!(
        server.log_matching("panicked").is_empty(),
        "{:?}",
        server.log_matching("panicked")
    );

    // 4. A WebSocket upgrade on a path that does not exist.
    let url = format!("ws://{}/nope/live1", server.http);
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(
                body.contains("nothing at /nope/live1"),
                "clear error body: {body}"
            );
        }
        other => panic!("expected a 404, got {other:?}"),
    }

    // 5. A second publisher on the live name.
    let second = Publisher::start(&server.rtmp_url("live1"), Profile::default());
    let (status, _) = second.wait_exit(T).await;
    assert!(!status.success(), "second publisher was accepted");
    server
        .wait_log("stream \"live1\" is already being published", T)
        .await;

    // 6. A codec we cannot carry (Sorenson H.263).
    let url = server.rtmp_url("h263");
    let mut h263 = ffmpeg(&[
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=15",
        "-t",
        "5",
        "-c:v",
        "flv1",
        "-f",
        "flv",
        &url,
    ]);
    let status = tokio::time::timeout(T, h263.wait())
        .await
        .expect("ffmpeg exits")
        .expect("wait");
    assert!(!status.success(), "unsupported codec was accepted");
    server
        .wait_log("unsupported video codec: Sorenson H.263", T)
        .await;

    // The server is up, and the live stream lost nothing.
    assert!(server.still_running());
    let bad_input_end = onair_tests::unix_us(std::time::SystemTime::now());
    let api = server.api("/api/streams/live1").await;
    assert_eq!(api["live"], true);
    stop_tx.send(()).expect("stop reader");
    let rec = reader.await.expect("reader");
    // Continuous frames from before the first bad input to after the last one: none lost.
    let first = rec.video_frames.first().expect("frames").3;
    let last = rec.video_frames.last().expect("frames").3;
    assert!(
        first < bad_input_start && last > bad_input_end,
        "frames cover the whole test"
    );
    rec.assert_video_continuous(35);
    rec.assert_audio_continuous(25);
}
