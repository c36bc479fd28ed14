//! SRT ingest with Debian's ffmpeg (5.1, built with libsrt) as the caller: both streamid forms,
//! every frame to a viewer keyframe first with the B-frames' composition offsets kept, 1316-byte
//! messages, HEVC, and refusals the sender sees (wrong or missing passphrase, a passphrase the
//! server has none for, wrong token, read mode).

use std::time::Duration;

use onair_tests::{Server, Viewer, require_tool};

const T: Duration = Duration::from_secs(20);
/// Frames a viewer must get in a row, none missing: four seconds at 30 fps. ffmpeg sends
/// more (a live-mode SRT caller drops what is unsent when it closes).
const FRAMES: usize = 120;
/// A frame's duration at 30 fps, ms: a dts step beyond it is a frame missing.
const FRAME_MS: u64 = 34;

/// A server with no ladder, so the viewer sees the source alone; `extra` TOML on top.
async fn server(extra_toml: &str, args: &[&str]) -> Server {
    let toml = format!("{extra_toml}\n[streams.\"*\"]\nladder = []\n");
    Server::start_with_config(&toml, args, &[]).await
}

/// x264 with two B-frames, a keyframe a second.
const H264: &[&str] = &[
    "-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "30",
];
/// x265 with B-frames (its default), a keyframe a second.
const HEVC: &[&str] = &[
    "-c:v",
    "libx265",
    "-preset",
    "ultrafast",
    "-x265-params",
    "log-level=none:keyint=30:bframes=2",
];

/// Debian's ffmpeg sending FRAMES frames of H.264 with B-frames and AAC over SRT, with the
/// given URL query (streamid and options).
fn ffmpeg_srt(server: &Server, query: &str) -> tokio::process::Child {
    ffmpeg_srt_with(server, query, H264)
}

fn ffmpeg_srt_with(server: &Server, query: &str, video: &[&str]) -> tokio::process::Child {
    require_tool("ffmpeg");
    let url = format!("srt://{}?{query}", server.srt);
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-frames:v", &(3 * FRAMES).to_string()])
        .args(video)
        .args(["-c:a", "aac", "-shortest"])
        .args(["-f", "mpegts", &url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg")
}

/// Waits for ffmpeg to end; returns whether it succeeded and what it printed.
async fn ffmpeg_ends(child: tokio::process::Child) -> (bool, String) {
    let out = tokio::time::timeout(T, child.wait_with_output())
        .await
        .expect("ffmpeg ends in time")
        .expect("wait ffmpeg");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A viewer of `name` from before the publish: FRAMES video frames in a row, keyframe first,
/// none missing (dts steps of one frame), some with a composition offset (the B-frames).
async fn every_frame(server: &Server, name: &str, query: &str) {
    every_frame_of(server, name, query, H264, "avc1.").await
}

async fn every_frame_of(server: &Server, name: &str, query: &str, video: &[&str], codec: &str) {
    let mut viewer = Viewer::connect(&server.ws_url(name)).await;
    let ffmpeg = ffmpeg_srt_with(server, query, video);
    onair_tests::every_frame_with_cts(&mut viewer, codec, FRAMES, FRAME_MS).await;
    // Ended as an operator would (SIGTERM): ffmpeg closes its SRT connection, and the next
    // publish of the test may take the name.
    let pid = ffmpeg.id().expect("ffmpeg running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(kill.is_ok_and(|s| s.success()), "kill -TERM ffmpeg");
    ffmpeg_ends(ffmpeg).await;
    server
        .wait_log(&format!("SRT publish ended stream={name}"), T)
        .await;
}

/// ffmpeg with `query` is refused in the handshake, sees it, and the server says `why`.
async fn refused(server: &Server, query: &str, why: &str) {
    let from = server.log_lines();
    let (ok, err) = ffmpeg_ends(ffmpeg_srt(server, query)).await;
    assert!(!ok, "{query}: ffmpeg should have been refused");
    assert!(
        err.contains("REJECT") || err.contains("Connection setup failure"),
        "{query}: the sender sees the refusal: {err}"
    );
    server.wait_log_since(from, why, T).await;
}

#[tokio::test]
async fn ffmpeg_publishes_over_srt_in_both_streamid_forms() {
    let server = server("", &[]).await;
    every_frame(&server, "cam", "streamid=publish:cam").await;
    let line = server.wait_log("first SRT message", T).await;
    assert!(line.contains("bytes=1316"), "standard TS messages: {line}");
    // SRS's form, with the application name in front.
    every_frame(&server, "cam2", "streamid=#!::r=live/cam2,m=publish").await;
    every_frame_of(&server, "hevc", "streamid=publish:hevc", HEVC, "hvc1.").await;
}

#[tokio::test]
async fn a_passphrase_is_required_and_checked() {
    let pass = "correcthorsebattery";
    let server = server(&format!("srt_passphrase = \"{pass}\""), &[]).await;
    every_frame(
        &server,
        "enc",
        &format!("streamid=publish:enc&passphrase={pass}"),
    )
    .await;
    for (query, why) in [
        ("streamid=publish:enc", "SRT handshake failed"),
        (
            "streamid=publish:enc&passphrase=wronghorsebattery",
            "SRT handshake failed",
        ),
    ] {
        refused(&server, query, why).await;
    }
}

#[tokio::test]
async fn credentials_and_modes_are_refused_before_the_handshake_completes() {
    let server = server(
        "[streams.keyed]\npublish_key = \"0123456789abcdef\"\nladder = []",
        &[],
    )
    .await;
    for (query, why) in [
        ("streamid=publish:keyed", "credentials required"),
        ("streamid=publish:keyed:token=wrong", "wrong key or token"),
        ("streamid=read:keyed", "takes publishers only"),
        // A caller that encrypts where the server has no passphrase: refused, and the listener
        // lives on (srt-protocol 0.4.4 panicked here: third_party/srt-protocol/ONAIR.md).
        (
            "streamid=publish:keyed:token=0123456789abcdef&passphrase=somepassphrase",
            "SRT handshake failed",
        ),
    ] {
        refused(&server, query, why).await;
    }
    every_frame(
        &server,
        "keyed",
        "streamid=publish:keyed:token=0123456789abcdef",
    )
    .await;
    assert!(
        server.log_matching("SRT listener ended").is_empty(),
        "the listener never had to restart"
    );
}
