//! HTTP CMAF push with Debian's ffmpeg (5.1) as the encoder: `-f dash -method PUT -streaming 1
//! -ldash 1 -http_persistent 1 http://HOST/push/STREAM/manifest.mpd`. Every frame reaches a
//! viewer keyframe first with its B-frame composition offsets, Chromium plays the stream, the
//! publish needs the same credentials as every other way in (an HTTP Basic password here), and
//! the delay the push adds over RTMP is measured from the same encoder's frames on both.

use std::collections::HashMap;
use std::time::Duration;

use onair_protocol::wire::Message;
use onair_tests::browser::Browser;
use onair_tests::{Server, Viewer, require_player, require_tool, start_of};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);
/// Frames a viewer must get in a row, none missing: four seconds at 30 fps.
const FRAMES: usize = 120;
/// A frame's duration at 30 fps, ms (rounded up): a larger dts step is a frame missing.
const FRAME_MS: u64 = 34;
const KEY: &str = "0123456789abcdef";

/// A server with no ladder, so that the viewer sees the source alone; `extra` TOML on top.
async fn server(extra_toml: &str) -> Server {
    let toml = format!("{extra_toml}\n[streams.\"*\"]\nladder = []\n");
    Server::start_with_config(&toml, &[], &[]).await
}

/// ffmpeg's dash muxer in low-latency streaming mode, PUTting to `url`.
const DASH: &[&str] = &[
    "-f",
    "dash",
    "-method",
    "PUT",
    "-streaming",
    "1",
    "-ldash",
    "1",
    "-http_persistent",
    "1",
    "-seg_duration",
    "2",
];

/// x264 with two B-frames, a keyframe a second.
const H264: &[&str] = &[
    "-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "30",
];

fn ffmpeg(args: &[&str]) -> tokio::process::Child {
    require_tool("ffmpeg");
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg")
}

/// H.264 with B-frames and AAC, pushed over HTTP to `url` (with `auth` options before it).
fn push(url: &str, auth: &[&str]) -> tokio::process::Child {
    let frames = (4 * FRAMES).to_string();
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-frames:v",
        &frames,
    ];
    args.extend_from_slice(H264);
    args.extend_from_slice(&["-c:a", "aac", "-shortest"]);
    args.extend_from_slice(DASH);
    args.extend_from_slice(auth);
    args.push(url);
    ffmpeg(&args)
}

fn push_url(server: &Server, name: &str) -> String {
    format!("http://{}/push/{name}/manifest.mpd", server.http)
}

async fn api_stream(server: &Server, name: &str) -> Value {
    server.api(&format!("/api/streams/{name}")).await
}

/// Every frame to a viewer keyframe first, the API's publisher, Chromium playing it, and the
/// end of the publish when ffmpeg writes its last (static) MPD.
#[tokio::test]
async fn an_ffmpeg_dash_push_plays_every_frame_and_in_chromium() {
    require_player();
    let server = server("").await;
    let mut viewer = Viewer::connect(&server.ws_url("pushed")).await;
    let ffmpeg = push(&push_url(&server, "pushed"), &[]);
    onair_tests::every_frame_with_cts(&mut viewer, "avc1.", FRAMES, FRAME_MS).await;
    drop(viewer);
    let api = api_stream(&server, "pushed").await;
    assert_eq!(api["publisher"]["protocol"], "cmaf", "{api}");
    assert_eq!(api["renditions"][0]["width"], 640, "{api}");

    let b = Browser::start().await.expect("start Chromium");
    b.goto(&format!("http://{}/watch/pushed", server.http))
        .await
        .expect("open the watch page");
    let cond = "(() => { const v = document.querySelector('video'); \
        const q = v.getVideoPlaybackQuality(); \
        const s = { frames: q.totalVideoFrames, time: v.currentTime, \
          error: v.error ? `${v.error.code} ${v.error.message}` : null }; \
        if (s.error || (s.frames >= 60 && s.time > 1)) return s; \
        throw new Error(JSON.stringify(s)); })()";
    let s = b
        .wait_for(cond, T, "60 decoded frames")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s["error"], Value::Null, "MediaError: {s}");
    b.close().await.expect("close Chromium");

    // ffmpeg ends after its frames and PUTs a static MPD: the stream ends with it, not after
    // the idle timeout.
    let out = tokio::time::timeout(Duration::from_secs(30), ffmpeg.wait_with_output())
        .await
        .expect("ffmpeg ends")
        .expect("wait ffmpeg");
    let log = server
        .wait_log("HTTP CMAF push ended", Duration::from_secs(5))
        .await;
    assert!(
        log.contains("last MPD"),
        "{log}\nffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = onair_tests::http_get(&server.http, "/api/streams/pushed")
        .await
        .expect("API");
    assert_eq!(status, 404, "the stream is gone");
}

/// With a publish key, a push without it is refused (401, counted), and the key as the
/// password of HTTP Basic (`http://push:KEY@HOST/...`, `-http_opts auth_type=basic`, so that
/// ffmpeg sends it on every PUT) publishes.
#[tokio::test]
async fn a_push_needs_the_publish_key() {
    let server = server(&format!("[streams.keyed]\npublish_key = \"{KEY}\"")).await;
    let from = server.log_lines();
    let _refused = push(&push_url(&server, "keyed"), &[]);
    let line = server.wait_log_since(from, "publish refused", T).await;
    assert!(line.contains("cmaf"), "{line}");
    let (status, _) = onair_tests::http_get(&server.http, "/api/streams/keyed")
        .await
        .expect("API");
    assert_eq!(status, 404, "not live without the key");
    let r = onair_tests::http_send(
        &server.http,
        "PUT",
        "/push/keyed/init-stream0.m4s",
        &[],
        b"",
    )
    .await
    .expect("PUT");
    assert_eq!(r.status, 401, "{}", r.text());
    drop(_refused);

    let mut viewer = Viewer::connect(&server.ws_url("keyed")).await;
    let url = format!("http://push:{KEY}@{}/push/keyed/manifest.mpd", server.http);
    let _ffmpeg = push(&url, &["-http_opts", "auth_type=basic"]);
    let got = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    assert!(start_of(&got).keyframe_first, "keyframe first");
    let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 45, "{frames} frames in 2 s");
}

/// Bad bytes get a clear refusal and end the publish; the server goes on serving.
#[tokio::test]
async fn bad_segments_are_refused_with_a_reason() {
    let server = server("").await;
    let put = |path: &'static str, body: &'static [u8]| {
        let addr = server.http.clone();
        async move {
            onair_tests::http_send(&addr, "PUT", path, &[], body)
                .await
                .expect("PUT")
        }
    };
    let r = put(
        "/push/bad/init-stream0.m4s",
        b"\x00\x00\x00\x10moovgarbagegarb",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("moov"), "{}", r.text());
    let r = put("/push/bad/chunk-stream0-00001.m4s", b"\x00\x00\x00\x08moof").await;
    assert_eq!(
        r.status,
        409,
        "a media segment before any init: {}",
        r.text()
    );
    let r = put("/push/bad/index.html", b"x").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let (status, _) = onair_tests::http_get(&server.http, "/api/streams")
        .await
        .expect("API");
    assert_eq!(status, 200);
}

/// One ffmpeg, one encoder setting, two outputs: RTMP to one stream and the dash push to
/// another. The same source frame's ingest times on both (as their viewers receive them) give
/// the delay the push adds. It must stay far below a segment (2 s): frames go to viewers as
/// their fragment completes, not when the segment does. The figures go to docs/benchmarks.md.
#[tokio::test]
async fn the_push_adds_little_delay_over_rtmp() {
    let server = server("").await;
    let mut via_rtmp = Viewer::connect(&server.ws_url("via-rtmp")).await;
    let mut via_push = Viewer::connect(&server.ws_url("via-push")).await;
    let rtmp = server.rtmp_url("via-rtmp");
    let push = push_url(&server, "via-push");
    let frames = (3 * FRAMES).to_string();
    let enc = [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-tune",
        "zerolatency",
        "-g",
        "30",
    ];
    let mut args = vec!["-frames:v", frames.as_str(), "-map", "0:v"];
    args.extend_from_slice(&enc);
    args.extend_from_slice(&["-f", "flv", rtmp.as_str(), "-map", "0:v"]);
    args.extend_from_slice(&enc);
    args.extend_from_slice(DASH);
    args.push(push.as_str());
    let _ffmpeg = ffmpeg(&args);

    /// Frame index (from the viewer's first frame) to ingest time, µs.
    async fn ingest_times(viewer: &mut Viewer, n: usize) -> HashMap<u64, u64> {
        let mut times = HashMap::new();
        let mut first = None;
        while times.len() < n {
            let r = viewer.recv(T).await;
            if let Message::Media { header, .. } = r.msg()
                && header.track == 0
            {
                let first = *first.get_or_insert(header.dts);
                let index = ((header.dts - first) as f64 * 30.0 / 1000.0).round() as u64;
                times.insert(index, header.ingest_us);
            }
        }
        times
    }
    let n = 2 * FRAMES;
    let (a, b) = tokio::join!(
        ingest_times(&mut via_rtmp, n),
        ingest_times(&mut via_push, n)
    );
    // Past the first second (encoder start-up), every frame both have.
    let mut delays: Vec<i64> = a
        .iter()
        .filter(|(i, _)| **i >= 30)
        .filter_map(|(i, t)| b.get(i).map(|u| *u as i64 - *t as i64))
        .collect();
    assert!(delays.len() > FRAMES, "{} frames matched", delays.len());
    delays.sort_unstable();
    let pct = |p: usize| delays[(delays.len() - 1) * p / 100] as f64 / 1000.0;
    let (median, p90, max) = (pct(50), pct(90), pct(100));
    eprintln!(
        "HTTP CMAF push over RTMP, {} frames: median {median:.1} ms, p90 {p90:.1} ms, max \
         {max:.1} ms",
        delays.len()
    );
    assert!(
        median < 1000.0 && p90 < 1000.0,
        "frames wait for their segment: median {median} ms, p90 {p90} ms"
    );
}
