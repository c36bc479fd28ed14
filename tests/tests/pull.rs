//! Pulled sources through the stream API, with real ffmpeg as the server's child: onair's own
//! LL-HLS of another stream and a file, live within seconds and keyframe first; `DELETE` ends
//! a pull; an unreachable source shows `retrying` with ffmpeg's error; on demand waits for a
//! viewer and stops a while after the last one; bad input gets 400, 409, 401 or 403 with a
//! reason.

use std::time::Duration;

use onair_protocol::wire::{Message, StatusCode};
use onair_tests::{Profile, Publisher, Server, Viewer, http_fetch, http_send, start_of};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);
const ADMIN: &str = "pull-test-admin-token-0123";

async fn server() -> Server {
    let toml = "[streams.\"*\"]\nladder = []\n";
    Server::start_with_config(toml, &[], &[("ONAIR_ADMIN_TOKEN", ADMIN)]).await
}

async fn post(server: &Server, body: &Value, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let r = http_send(
        &server.http,
        "POST",
        "/api/streams",
        &headers,
        body.to_string().as_bytes(),
    )
    .await
    .expect("POST /api/streams");
    (r.status, String::from_utf8_lossy(&r.body).to_string())
}

async fn get_stream(server: &Server, name: &str) -> (u16, Value) {
    let r = http_fetch(&server.http, "GET", &format!("/api/streams/{name}"), &[])
        .await
        .expect("GET /api/streams/NAME");
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// Waits for the stream's publisher to be in `state`; returns the stream.
async fn wait_state(server: &Server, name: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, v) = get_stream(server, name).await;
        if status == 200 && v["publisher"]["state"] == state {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: not {state} in time: {status} {v}"
        );
        // The API has no way to wait for a state change; it is read again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A viewer of `name` gets an init and then a keyframe first, and keeps getting frames.
async fn plays(server: &Server, name: &str) -> Viewer {
    let mut viewer = Viewer::connect(&server.ws_url(name)).await;
    let got = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let start = start_of(&got);
    assert!(start.keyframe_first, "{name}: keyframe first");
    assert!(start.codec.starts_with("avc1."), "{name}: {}", start.codec);
    assert!(start.audio, "{name}: with its audio (AAC)");
    let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
    assert!(frames >= 40, "{name}: {frames} frames in 2 s");
    viewer
}

#[tokio::test]
async fn a_pull_of_an_hls_url_and_of_a_file_plays_and_delete_ends_it() {
    let server = server().await;
    let _origin = Publisher::start(&server.rtmp_url("origin"), Profile::default());
    server.wait_log("publishing", T).await;
    // onair's own LL-HLS of another stream is the remote source.
    let hls = format!("http://{}/hls/origin/index.m3u8", server.http);
    let (status, body) = post(
        &server,
        &json!({ "name": "relay", "source_url": hls, "on_demand": false }),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(created["publisher"]["protocol"], "pull");
    assert_eq!(created["publisher"]["source"], hls.as_str());
    let mut relay = plays(&server, "relay").await;
    let v = wait_state(&server, "relay", "live").await;
    assert_eq!(v["publisher"]["protocol"], "pull", "{v}");
    assert_eq!(v["live"], true, "{v}");

    // A file, played in a loop.
    let clip =
        onair_tests::browser::artifacts_dir().join(format!("pull-clip-{}.mp4", std::process::id()));
    let made = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", "3", "-c:v", "libx264", "-g", "30", "-c:a", "aac"])
        .arg(&clip)
        .status()
        .expect("run ffmpeg");
    assert!(made.success(), "make the clip");
    let (status, body) = post(
        &server,
        &json!({ "name": "loop", "source_url": clip.to_string_lossy() }),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let _looped = plays(&server, "loop").await;

    // DELETE ends the pull: its viewer is told the stream is waiting.
    let auth = format!("Bearer {ADMIN}");
    let r = http_fetch(
        &server.http,
        "DELETE",
        "/api/streams/relay",
        &[("Authorization", &auth)],
    )
    .await
    .expect("DELETE");
    assert_eq!(r.status, 204);
    relay
        .recv_until(
            T,
            |m| matches!(m, Message::Status(s) if s.code == StatusCode::Waiting),
        )
        .await;
    let (_, v) = get_stream(&server, "relay").await;
    assert_ne!(v["publisher"]["protocol"], "pull", "{v}");
}

#[tokio::test]
async fn an_unreachable_source_retries_with_its_error_and_bad_input_is_refused() {
    let server = server().await;
    let (status, body) = post(
        &server,
        &json!({ "name": "down", "source_url": "rtsp://127.0.0.1:9/none" }),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let v = wait_state(&server, "down", "retrying").await;
    let error = v["publisher"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("ffmpeg ended"), "ffmpeg's failure: {v}");
    assert!(
        error.len() > "ffmpeg ended".len() + 10,
        "with its reason: {v}"
    );

    let url = "rtsp://127.0.0.1:9/none";
    for (body, token, want, why) in [
        (
            json!({ "name": "x", "source_url": "gopher://h/x" }),
            Some(ADMIN),
            400,
            "unknown scheme",
        ),
        (
            json!({ "name": "x", "source_url": "clip.mp4" }),
            Some(ADMIN),
            400,
            "absolute path",
        ),
        (
            json!({ "name": "a/b", "source_url": url }),
            Some(ADMIN),
            400,
            "not a valid stream name",
        ),
        (
            json!({ "name": "x", "source_url": url, "ladder": ["999p"] }),
            Some(ADMIN),
            400,
            "unknown preset",
        ),
        (json!({ "name": "x" }), Some(ADMIN), 400, "source_url"),
        (
            json!({ "name": "down", "source_url": url }),
            Some(ADMIN),
            409,
            "pulled already",
        ),
        (
            json!({ "name": "x", "source_url": url }),
            None,
            401,
            "admin token",
        ),
        (
            json!({ "name": "x", "source_url": url }),
            Some("wrong-token-0123456789"),
            403,
            "wrong admin token",
        ),
    ] {
        let (status, text) = post(&server, &body, token).await;
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
}

#[tokio::test]
async fn an_on_demand_source_starts_on_its_first_viewer() {
    let server = server().await;
    let clip = onair_tests::browser::artifacts_dir()
        .join(format!("pull-demand-{}.mp4", std::process::id()));
    let made = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", "2", "-c:v", "libx264", "-g", "30", "-c:a", "aac"])
        .arg(&clip)
        .status()
        .expect("run ffmpeg");
    assert!(made.success());
    let (status, body) = post(
        &server,
        &json!({ "name": "demand", "source_url": clip.to_string_lossy(), "on_demand": true }),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let v = wait_state(&server, "demand", "idle").await;
    assert_eq!(v["live"], false, "{v}");
    let viewer = plays(&server, "demand").await;
    wait_state(&server, "demand", "live").await;
    // The last viewer leaves: ffmpeg stops ON_DEMAND_LINGER (10 s) later.
    drop(viewer);
    let left = std::time::Instant::now();
    wait_state(&server, "demand", "idle").await;
    assert!(
        left.elapsed() >= Duration::from_secs(9),
        "stopped after its linger, not at once: {:?}",
        left.elapsed()
    );
    server.wait_log("on-demand source stopped", T).await;
}
