//! HEVC, AV1 and VP9 over Enhanced RTMP from a current ffmpeg (9, from PyPI), carried end to
//! end: the API names the codec, WebSocket viewers get its init and keyframe-first frames,
//! ffprobe decodes the LL-HLS, Chromium plays AV1 through MSE, and a browser that cannot
//! decode HEVC (this Chromium's MSE cannot) is given the H.264 ladder rung instead.

use std::time::Duration;

use onair_protocol::wire::Message;
use onair_tests::browser::Browser;
use onair_tests::{Server, Start, Viewer, ffmpeg9, require_player, start_of};
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// ffmpeg 9 publishing `testsrc2` 640x360 at 30 fps and a sine in AAC, video encoded with
/// `video` (a keyframe every second).
fn publish(video: &[&str], url: &str) -> tokio::process::Child {
    tokio::process::Command::new(ffmpeg9())
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(video)
        .args(["-g", "30", "-c:a", "aac", "-f", "flv", url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg 9")
}

const HEVC: &[&str] = &[
    "-c:v",
    "libx265",
    "-preset",
    "ultrafast",
    "-x265-params",
    "log-level=none:bframes=0",
];
const AV1: &[&str] = &[
    "-c:v",
    "libsvtav1",
    "-preset",
    "12",
    "-svtav1-params",
    "lp=1",
];
const VP9: &[&str] = &[
    "-c:v",
    "libvpx-vp9",
    "-deadline",
    "realtime",
    "-cpu-used",
    "8",
];

/// A server whose streams have no ladder (unless the test says otherwise).
async fn server_without_ladder() -> Server {
    Server::start_with_config("[streams.\"*\"]\nladder = []\n", &[], &[]).await
}

/// Connects to `url` and reads up to the first media frame.
async fn first_frames(url: &str) -> (Viewer, Start) {
    let mut viewer = Viewer::connect(url).await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    let start = start_of(&got);
    (viewer, start)
}

async fn api_stream(server: &Server, name: &str) -> Value {
    let (status, body) = onair_tests::http_get(&server.http, &format!("/api/streams/{name}"))
        .await
        .expect("GET /api/streams/NAME");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stream json")
}

/// ffprobe (Debian's) reads the stream's LL-HLS and finds `codec_name` at 640x360, and
/// ffmpeg decodes three seconds of it without an error.
async fn hls_decodes(server: &Server, name: &str, codec_name: &str) {
    // Three segments first, so that ffprobe does not meet the live edge at once: a blocking
    // reload for each returns when it exists.
    for msn in 0..=3 {
        let path = format!("/hls/{name}/index.m3u8?_HLS_msn={msn}");
        let (status, body) = onair_tests::http_get(&server.http, &path)
            .await
            .expect("GET playlist");
        assert_eq!(status, 200, "{path}: {body}");
    }
    let url = format!("http://{}/hls/{name}/index.m3u8", server.http);
    onair_tests::hls_decodes(&url, codec_name, (640, 360), 3).await;
}

/// The watch page's video element and player, as the test reads them.
const PAGE: &str = r#"(() => {
  const v = document.querySelector('video');
  const s = window.onairPlayer ? window.onairPlayer.stats() : {};
  return { frames: v.getVideoPlaybackQuality().totalVideoFrames, time: v.currentTime,
    width: v.videoWidth, height: v.videoHeight, rendition: s.rendition,
    error: v.error ? `${v.error.code} ${v.error.message}` : null };
})()"#;

/// Opens the watch page and waits until the video element has decoded 60 frames (two seconds)
/// with no media error; returns the page state then.
async fn chromium_plays(b: &Browser, server: &Server, name: &str) -> Value {
    b.goto(&format!("http://{}/watch/{name}", server.http))
        .await
        .expect("open the watch page");
    let cond = format!(
        "(() => {{ const s = {PAGE}; if (s.error) return s; if (s.frames >= 60 && s.time > 1) \
         return s; throw new Error(JSON.stringify(s)); }})()"
    );
    let s = b
        .wait_for(&cond, T, "60 decoded frames")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s["error"], Value::Null, "MediaError: {s}");
    s
}

#[tokio::test]
async fn hevc_is_carried_to_viewers_and_ffprobe_decodes_its_hls() {
    let server = server_without_ladder().await;
    let _ffmpeg = publish(HEVC, &server.rtmp_url("hevc"));
    let (mut viewer, start) = first_frames(&server.ws_url("hevc")).await;
    assert!(start.codec.starts_with("hvc1."), "{}", start.codec);
    assert_eq!(start.size, (640, 360));
    assert!(start.keyframe_first, "keyframe first");
    let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 45, "{frames} HEVC frames in 2 s");
    let api = api_stream(&server, "hevc").await;
    let codec = api["renditions"][0]["codec"].as_str().unwrap_or_default();
    assert!(codec.starts_with("hvc1."), "API: {api}");
    hls_decodes(&server, "hevc", "hevc").await;
}

#[tokio::test]
async fn av1_is_carried_and_chromium_plays_it_through_mse() {
    require_player();
    let server = server_without_ladder().await;
    let _ffmpeg = publish(AV1, &server.rtmp_url("av1"));
    let (mut viewer, start) = first_frames(&server.ws_url("av1")).await;
    assert!(start.codec.starts_with("av01."), "{}", start.codec);
    assert_eq!(start.size, (640, 360));
    assert!(start.keyframe_first, "keyframe first");
    let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 45, "{frames} AV1 frames in 2 s");
    drop(viewer);
    let b = Browser::start().await.expect("start Chromium");
    let s = chromium_plays(&b, &server, "av1").await;
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(640), Some(360)),
        "{s}"
    );
    b.close().await.expect("close Chromium");
    hls_decodes(&server, "av1", "av1").await;
}

#[tokio::test]
async fn vp9_takes_its_picture_size_from_the_first_keyframe() {
    let server = server_without_ladder().await;
    let _ffmpeg = publish(VP9, &server.rtmp_url("vp9"));
    let (mut viewer, start) = first_frames(&server.ws_url("vp9")).await;
    assert!(start.codec.starts_with("vp09."), "{}", start.codec);
    assert_eq!(
        start.size,
        (640, 360),
        "from the keyframe: vpcC has no size"
    );
    assert!(start.keyframe_first, "keyframe first");
    let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 45, "{frames} VP9 frames in 2 s");
}

/// The default ladder makes H.264 rungs of an HEVC source: a player that says it decodes only
/// H.264 starts on one (and is never sent the HEVC init), one that says nothing gets the
/// source, and Chromium (whose MSE here plays no HEVC) plays the rung on the watch page.
#[tokio::test]
async fn a_player_that_cannot_decode_hevc_gets_an_h264_rung() {
    require_player();
    let server = Server::start(&[]).await;
    let _ffmpeg = publish(HEVC, &server.rtmp_url("hevc-ladder"));
    let ws = server.ws_url("hevc-ladder");
    // Joined before the rung exists: held, then moved to it once it does.
    let mut early = Viewer::connect(&format!("{ws}?codecs=avc1")).await;
    let (_, source) = first_frames(&ws).await;
    assert!(source.codec.starts_with("hvc1."), "{}", source.codec);
    let got = early
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    for r in &got {
        if let Message::Init(init) = r.msg() {
            assert!(
                init.tracks.iter().all(|t| !t.codec.starts_with("hvc1")),
                "an HEVC init sent to an H.264-only player: {init:?}"
            );
        }
    }
    let early_start = start_of(&got);
    assert!(
        early_start.codec.starts_with("avc1."),
        "{}",
        early_start.codec
    );
    assert_ne!(early_start.rendition, 0, "a rung, not the source");
    assert!(early_start.keyframe_first, "keyframe first");
    let (mut late, late_start) = first_frames(&format!("{ws}?codecs=avc1,av01")).await;
    assert!(
        late_start.codec.starts_with("avc1."),
        "{}",
        late_start.codec
    );
    assert!(late_start.keyframe_first);
    let frames = late.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 45, "{frames} rung frames in 2 s");
    let api = api_stream(&server, "hevc-ladder").await;
    let codecs: Vec<&str> = api["renditions"]
        .as_array()
        .expect("renditions")
        .iter()
        .filter_map(|r| r["codec"].as_str())
        .collect();
    assert!(
        codecs[0].starts_with("hvc1.") && codecs[1..].iter().all(|c| c.starts_with("avc1.")),
        "{codecs:?}"
    );

    // LL-HLS lists every rendition with its real codec.
    let (status, playlist) = onair_tests::http_get(&server.http, "/hls/hevc-ladder/index.m3u8")
        .await
        .expect("GET the multivariant playlist");
    assert_eq!(status, 200, "{playlist}");
    assert!(
        playlist.contains("CODECS=\"hvc1.") && playlist.contains("CODECS=\"avc1."),
        "{playlist}"
    );

    let b = Browser::start().await.expect("start Chromium");
    let s = chromium_plays(&b, &server, "hevc-ladder").await;
    let rendition = s["rendition"].as_u64().expect("the player's rendition");
    assert_ne!(rendition, 0, "Chromium on the source: {s}");
    let height = s["height"].as_u64().expect("the video's height");
    assert!(height < 360, "a rung's picture, not the source's: {s}");
    b.close().await.expect("close Chromium");
}
