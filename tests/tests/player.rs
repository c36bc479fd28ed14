//! The Wasm player in real headless Chromium, fed by real ffmpeg through the real server:
//! decoded frames, pixels on screen, audio, republish at another resolution, a server restart,
//! and the live latency it holds (the figure docs/benchmarks.md quotes comes from here).

use std::time::Duration;

use onair_tests::browser::{Browser, Screenshot};
use onair_tests::{Profile, Publisher, Server, require_player};
use serde_json::Value;

/// The target live latency the pages are opened with (the player's default).
const TARGET_MS: f64 = 200.0;

/// What the tests read from the page: the player's stats plus the element's own counters.
const PAGE_STATE: &str = r#"(() => {
  const v = document.querySelector('video');
  const p = window.onairPlayer;
  const s = p ? p.stats() : {};
  const b = v.buffered;
  return {
    state: s.state, latencyMs: s.latencyMs, bufferMs: s.bufferMs, deliveryMs: s.deliveryMs,
    decodedFrames: v.getVideoPlaybackQuality().totalVideoFrames,
    droppedFrames: v.getVideoPlaybackQuality().droppedVideoFrames,
    audioBytes: v.webkitAudioDecodedByteCount || 0,
    currentTime: v.currentTime, width: v.videoWidth, height: v.videoHeight,
    bufferedEnd: b.length ? b.end(b.length - 1) : 0,
    bufferedStart: b.length ? b.start(0) : 0,
    ranges: Array.from({ length: b.length }, (_, i) => [b.start(i), b.end(i)]),
    error: v.error ? `${v.error.code} ${v.error.message}` : null,
    stalls: s.stalls, banner: document.getElementById('banner').hidden ? null
      : document.getElementById('banner').textContent,
  };
})()"#;

/// A `wait_for` expression: the page state once `cond` (over `s`) holds. Until then it throws
/// with the state, so a timeout shows where the page got stuck.
fn until(cond: &str) -> String {
    format!(
        "(() => {{ const s = {PAGE_STATE}; if ({cond}) return s; \
         throw new Error(JSON.stringify(s)); }})()"
    )
}

/// Waits for `cond` (see [`until`]) and returns the page state; panics with where it got stuck.
async fn wait_until(b: &Browser, cond: &str, timeout: Duration, what: &str) -> Value {
    let v = b
        .wait_for(&until(cond), timeout, what)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["error"], Value::Null, "MediaError: {v}");
    v
}

/// Marks the document, so that [`assert_same_document`] can tell that it was not reloaded.
async fn mark_document(b: &Browser) {
    b.eval("window.__sameDocument = true; return true;")
        .await
        .expect("mark the document");
}

async fn assert_same_document(b: &Browser) {
    let same = b
        .eval("return window.__sameDocument === true;")
        .await
        .expect("eval");
    assert_eq!(same, Value::Bool(true), "the page was reloaded");
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Waits until the page has decoded `frames` more frames than `since` and its clock moved on.
async fn wait_frames(b: &Browser, since: &Value, frames: f64, what: &str) -> Value {
    let cond = format!(
        "s.decodedFrames >= {} && s.currentTime > {}",
        num(since, "decodedFrames") + frames,
        num(since, "currentTime"),
    );
    wait_until(b, &cond, Duration::from_secs(20), what).await
}

/// The `<video>` as a person sees it: a real picture, not a black or single-colour box.
async fn assert_picture(b: &Browser, name: &str) -> Screenshot {
    let shot = b
        .screenshot_element("#video", name)
        .await
        .expect("screenshot");
    let colors = shot.distinct_colors();
    let stddev = shot.luma_stddev();
    assert!(
        colors > 50 && stddev > 20.0 && shot.fraction_non_black(30) > 0.5,
        "{}: the video looks blank ({colors} colours, luma stddev {stddev:.1})",
        shot.path.display()
    );
    shot
}

async fn open_watch(server: &Server, stream: &str) -> Browser {
    open_watch_page(server, stream, "").await
}

/// The watch page with a query string (`?rendition=…`).
async fn open_watch_page(server: &Server, stream: &str, query: &str) -> Browser {
    require_player();
    let b = Browser::start().await.expect("start chromium");
    b.goto(&format!("http://{}/watch/{stream}{query}", server.http))
        .await
        .expect("open the watch page");
    b
}

#[tokio::test]
async fn watch_page_plays_audio_and_video_at_the_target_latency() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(&server.rtmp_url("cam"), Profile::default());

    // The stream list links to the watch page and shows the resolution.
    require_player();
    let b = Browser::start().await.expect("start chromium");
    b.goto(&format!("http://{}/", server.http))
        .await
        .expect("open /");
    let row = b
        .wait_for(
            "(() => { const r = [...document.querySelectorAll('#streams tr')]\
               .find((tr) => tr.textContent.includes('640×360')); \
               return r && { text: r.textContent, href: r.querySelector('a').href }; })()",
            Duration::from_secs(15),
            "the stream listed on /",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        row["text"]
            .as_str()
            .is_some_and(|t| t.contains("cam") && t.contains("live")),
        "{row}"
    );
    let href = row["href"].as_str().expect("link").to_owned();
    assert!(href.ends_with("/watch/cam"), "{href}");

    b.goto(&href).await.expect("open the watch page");
    let first = wait_until(
        &b,
        "s.decodedFrames > 0",
        Duration::from_secs(15),
        "the first decoded frame",
    )
    .await;
    let started = std::time::Instant::now();
    let playing = wait_frames(&b, &first, 60.0, "two seconds of frames").await;
    assert_eq!(playing["state"], "playing", "{playing}");
    assert_eq!(
        (num(&playing, "width"), num(&playing, "height")),
        (640.0, 360.0)
    );
    assert!(
        num(&playing, "audioBytes") > 0.0,
        "no audio decoded: {playing}"
    );
    assert_eq!(
        playing["banner"],
        Value::Null,
        "a state banner covers the video: {playing}"
    );
    assert_picture(&b, "player-audio-video").await;

    // Held latency: after 20 s of playback, sample the page's live latency for 5 s.
    let left = Duration::from_secs(20).saturating_sub(started.elapsed());
    b.play_for(left).await.expect("play for 20 s");
    let samples = b
        .eval_async(&format!(
            "const done = arguments[arguments.length - 1]; const out = []; \
             const id = setInterval(() => {{ out.push({PAGE_STATE}); \
               if (out.length === 25) {{ clearInterval(id); done(out); }} }}, 200);"
        ))
        .await
        .expect("sample latency");
    let samples = samples.as_array().expect("samples");
    let mut latency: Vec<f64> = samples.iter().map(|s| num(s, "latencyMs")).collect();
    let mut independent: Vec<f64> = samples
        .iter()
        .map(|s| (num(s, "bufferedEnd") - num(s, "currentTime")) * 1000.0 + num(s, "deliveryMs"))
        .collect();
    latency.sort_by(f64::total_cmp);
    independent.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let last = samples.last().expect("a sample");
    let report = serde_json::json!({
        "target_ms": TARGET_MS,
        "latency_ms": { "p50": pct(&latency, 0.5), "p90": pct(&latency, 0.9), "max": pct(&latency, 1.0), "min": pct(&latency, 0.0) },
        "buffer_plus_delivery_ms": { "p50": pct(&independent, 0.5), "p90": pct(&independent, 0.9) },
        "played_s": started.elapsed().as_secs_f64(),
        "decoded_frames": num(last, "decodedFrames"),
        "dropped_frames": num(last, "droppedFrames"),
        "stalls": num(last, "stalls"),
        "chromium": "headless, Debian chromium",
    });
    let path = onair_tests::browser::artifacts_dir().join("player-latency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    println!("player latency: {report}");
    assert!(
        pct(&latency, 0.5) <= TARGET_MS + 100.0 && pct(&latency, 0.9) <= TARGET_MS + 100.0,
        "live latency after 20 s exceeds the target + 100 ms: {report}"
    );
    assert!(
        pct(&independent, 0.5) <= TARGET_MS + 100.0,
        "buffer + delivery after 20 s exceeds the target + 100 ms: {report}"
    );
    assert_eq!(last["error"], Value::Null);
    // Memory stays flat: what is behind the playhead is trimmed (the player keeps 4-8 s).
    let behind = num(last, "currentTime") - num(last, "bufferedStart");
    assert!(
        behind < 10.0,
        "{behind:.1} s kept behind the playhead: {last}"
    );
    b.close().await.expect("close chromium");
}

#[tokio::test]
async fn video_only_stream_with_b_frames_plays() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(
        &server.rtmp_url("bframes"),
        Profile {
            audio: false,
            // x264 defaults: B-frames, so composition offsets are not zero.
            zerolatency: false,
            ..Profile::default()
        },
    );
    let b = open_watch(&server, "bframes").await;
    let first = wait_until(
        &b,
        "s.decodedFrames > 0",
        Duration::from_secs(20),
        "the first decoded frame",
    )
    .await;
    let playing = wait_frames(&b, &first, 60.0, "two seconds of frames").await;
    assert_eq!(num(&playing, "audioBytes"), 0.0, "{playing}");
    assert_picture(&b, "player-video-only").await;
    b.close().await.expect("close chromium");
}

#[tokio::test]
async fn republish_at_another_resolution_resumes_without_a_reload() {
    let server = Server::start(&[]).await;
    let first_pub = Publisher::start(&server.rtmp_url("re"), Profile::default());
    let b = open_watch(&server, "re").await;
    let first = wait_until(
        &b,
        "s.width === 640 && s.decodedFrames > 10",
        Duration::from_secs(20),
        "640×360 playing",
    )
    .await;
    mark_document(&b).await;

    first_pub.kill().await;
    b.wait_for(
        "window.onairPlayer.state === 'waiting' && \
         document.getElementById('banner').textContent.includes('Waiting')",
        Duration::from_secs(10),
        "the waiting state",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let _second = Publisher::start(
        &server.rtmp_url("re"),
        Profile {
            width: 320,
            height: 240,
            ..Profile::default()
        },
    );
    let resumed = wait_until(
        &b,
        &format!(
            "s.width === 320 && s.height === 240 && s.decodedFrames > {} && \
                 s.state === 'playing'",
            num(&first, "decodedFrames") + 30.0
        ),
        Duration::from_secs(20),
        "320×240 playing after the republish",
    )
    .await;
    assert_same_document(&b).await;
    wait_frames(&b, &resumed, 30.0, "frames after the republish").await;
    assert_picture(&b, "player-republished").await;
    b.close().await.expect("close chromium");
}

#[tokio::test]
async fn player_reconnects_when_the_server_restarts() {
    let port = || onair_tests::free_port().expect("a free port");
    let http = format!("127.0.0.1:{}", port());
    let rtmp = format!("127.0.0.1:{}", port());
    let args = ["--http", http.as_str(), "--rtmp", rtmp.as_str()];
    let mut server = Server::start(&args).await;
    let publisher = Publisher::start(&server.rtmp_url("again"), Profile::default());
    let b = open_watch(&server, "again").await;
    let first = wait_until(
        &b,
        "s.decodedFrames > 10",
        Duration::from_secs(20),
        "playing",
    )
    .await;
    mark_document(&b).await;

    assert!(server.terminate().await.success());
    publisher.kill().await;
    b.wait_for(
        "window.onairPlayer.state === 'reconnecting'",
        Duration::from_secs(10),
        "the reconnecting state",
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let server = Server::start(&args).await;
    let _publisher = Publisher::start(&server.rtmp_url("again"), Profile::default());
    wait_until(
        &b,
        &format!(
            "s.state === 'playing' && s.decodedFrames > {}",
            num(&first, "decodedFrames") + 30.0
        ),
        Duration::from_secs(30),
        "playing again after the restart",
    )
    .await;
    assert_same_document(&b).await;
    assert_picture(&b, "player-reconnected").await;
    b.close().await.expect("close chromium");
}

/// The default ladder of a 640×360 source is one 240p rung. The watch page pinned to it plays
/// 240p from the start; switched to the source and back at run time (`setRendition`), the page
/// keeps playing through each switch, with no stall and no reload.
#[tokio::test]
async fn the_player_switches_renditions_at_keyframes_without_stalling() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(&server.rtmp_url("abr"), Profile::default());
    // The rung exists once the ladder's ffmpeg connected it; until then a pinned viewer plays
    // the source and moves to the rung when it comes, which is also fine here.
    let b = open_watch_page(&server, "abr", "?rendition=240p").await;
    let low = wait_until(
        &b,
        "s.height === 240 && s.decodedFrames > 30 && s.state === 'playing'",
        Duration::from_secs(30),
        "the 240p rendition playing",
    )
    .await;
    mark_document(&b).await;
    // What the element went through, for the failure message: each event with the page's
    // clock, the playhead, the ready state, the buffered ranges and the picture height.
    b.eval(
        "window.__events = []; const v = document.querySelector('#video');
         for (const e of ['waiting', 'playing', 'stalled', 'resize', 'seeking']) {
           v.addEventListener(e, () => {
             const r = [];
             for (let k = 0; k < v.buffered.length; k++)
               r.push([+v.buffered.start(k).toFixed(3), +v.buffered.end(k).toFixed(3)]);
             window.__events.push([e, Math.round(performance.now()), +v.currentTime.toFixed(3),
               v.readyState, r, v.videoHeight]);
           });
         }
         return true;",
    )
    .await
    .expect("listen to the element");
    let stalls = num(&low, "stalls");
    let rung = b
        .eval("return window.onairPlayer.stats().rendition;")
        .await
        .expect("rendition");
    assert_ne!(rung, Value::from(0), "on a rung, not the source: {low}");

    b.eval("window.onairPlayer.setRendition(0); return true;")
        .await
        .expect("switch to the source");
    let high = wait_until(
        &b,
        &format!(
            "s.height === 360 && s.decodedFrames > {} && s.state === 'playing'",
            num(&low, "decodedFrames") + 30.0
        ),
        Duration::from_secs(20),
        "the source (360p) playing after the switch",
    )
    .await;
    let high = wait_frames(&b, &high, 60.0, "frames after the switch up").await;

    b.eval(&format!(
        "window.onairPlayer.setRendition({rung}); return true;"
    ))
    .await
    .expect("switch back down");
    let back = wait_until(
        &b,
        &format!(
            "s.height === 240 && s.decodedFrames > {} && s.state === 'playing'",
            num(&high, "decodedFrames") + 30.0
        ),
        Duration::from_secs(20),
        "240p playing after the switch down",
    )
    .await;
    let back = wait_frames(&b, &back, 60.0, "frames after the switch down").await;
    assert_same_document(&b).await;
    let events = b
        .eval("return window.__events;")
        .await
        .expect("the element's events");
    assert_eq!(
        num(&back, "stalls"),
        stalls,
        "no stall across two switches: {back}; the element's events: {events}"
    );
    assert!(
        num(&back, "latencyMs") < 1000.0,
        "latency held across the switches: {back}"
    );
    assert_picture(&b, "player-switched").await;
    b.close().await.expect("close chromium");
}
