//! The control plane in real headless Chromium, fed by real ffmpeg through the real server: the
//! glass-to-glass latency a player reports, checked against an independent measure,
//! synchronized playback across two separate browser sessions, and the realtime dashboard.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use onair_protocol::wire::Message;
use onair_tests::browser::{Browser, artifacts_dir};
use onair_tests::{Feed, Profile, Publisher, Server, Viewer, require_player, unix_us};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn open_watch(server: &Server, stream: &str, query: &str) -> Browser {
    require_player();
    let b = Browser::start().await.expect("start chromium");
    b.goto(&format!("http://{}/watch/{stream}{query}", server.http))
        .await
        .expect("open the watch page");
    b
}

/// Waits until the page's player stats satisfy `cond` (over `s`); returns them.
async fn wait_stats(b: &Browser, cond: &str, timeout: Duration, what: &str) -> Value {
    let js = format!(
        "(() => {{ const p = window.onairPlayer; const s = p ? p.stats() : {{}}; \
         const v = document.querySelector('video'); \
         s.decodedFrames = v.getVideoPlaybackQuality().totalVideoFrames; \
         if ({cond}) return s; throw new Error(JSON.stringify(s)); }})()"
    );
    b.wait_for(&js, timeout, what)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn median(v: &mut [f64]) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[tokio::test]
async fn reported_latency_agrees_with_an_independent_measure() {
    // The player's own latency figure against an independent one: no ladder encoder competes
    // with Chromium for the two cores (with one, the page's buffer ran 60-70 ms ahead of its
    // reported latency in 2 of 4 runs, past the 30 ms this test allows).
    let config = tempdir().join("no-ladder.toml");
    std::fs::write(&config, "[streams.\"*\"]\nladder = []\n").expect("write config");
    let server = Server::start(&["--config", &config.to_string_lossy()]).await;
    let _publisher = Publisher::start(&server.rtmp_url("cam"), Profile::default());

    // The test's own viewer: how long frames take from ingest to a client here.
    let delivery: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
    let mut ws = Viewer::connect(&server.ws_url("cam")).await;
    let recorder = {
        let delivery = delivery.clone();
        tokio::spawn(async move {
            loop {
                let r = ws.recv(T).await;
                if let Message::Media { header, .. } = r.msg()
                    && header.track == 0
                {
                    let ms = unix_us(r.at).saturating_sub(header.ingest_us) as f64 / 1000.0;
                    delivery.lock().expect("lock").push((Instant::now(), ms));
                }
            }
        })
    };

    let b = open_watch(&server, "cam", "").await;
    let playing = wait_stats(
        &b,
        "s.state === 'playing' && s.decodedFrames > 60 && s.latencyMs > 0",
        T,
        "playback with a known latency",
    )
    .await;
    let viewer_id = num(&playing, "viewerId") as u64;
    b.play_for(Duration::from_secs(8)).await.expect("play");

    // For 10 s: the page's buffer ahead of the playhead every 250 ms, and what the player
    // reported to the server, as the server's feed shows it each second.
    let window = Instant::now();
    let page = b.eval_async_with(
        "const done = arguments[arguments.length - 1]; const out = []; \
         const v = document.querySelector('video'); \
         const id = setInterval(() => { const b = v.buffered; \
           if (b.length) out.push({ ahead: (b.end(b.length - 1) - v.currentTime) * 1000, \
             own: window.onairPlayer.latencyMs }); \
           if (out.length === 40) { clearInterval(id); done(out); } }, 250);",
        vec![],
        Duration::from_secs(20),
    );
    let reports = async {
        let mut feed = Feed::open(&server.http, "stream=cam&sort=id").await;
        let mut got = Vec::new();
        while got.len() < 10 {
            let snap = feed
                .snapshot_where(T, "the Chromium viewer's report", |s| {
                    s["viewers"]["rows"].as_array().is_some_and(|rows| {
                        rows.iter().any(|r| {
                            r["id"] == viewer_id
                                && r["report"]["age_ms"].as_u64().is_some_and(|a| a < 1500)
                        })
                    })
                })
                .await;
            let rows = snap["viewers"]["rows"].as_array().expect("rows").clone();
            let row = rows.iter().find(|r| r["id"] == viewer_id).expect("the row");
            assert_eq!(row["report"]["state"], "playing", "{row}");
            // One rendition: nothing to move it between, so it is not asked for receipts and
            // sends none.
            assert!(row["in_flight_bytes"].is_null(), "{row}");
            got.push(num(&row["report"], "latency_ms"));
        }
        got
    };
    let (page, mut reported) = tokio::join!(page, reports);
    let page = page.expect("sample the page");
    let samples = page.as_array().expect("samples");
    let mut ahead: Vec<f64> = samples.iter().map(|s| num(s, "ahead")).collect();
    let mut own: Vec<f64> = samples.iter().map(|s| num(s, "own")).collect();
    let mut delivered: Vec<f64> = delivery
        .lock()
        .expect("lock")
        .iter()
        .filter(|(at, _)| *at >= window)
        .map(|(_, ms)| *ms)
        .collect();
    recorder.abort();

    let reported_ms = median(&mut reported);
    let independent_ms = median(&mut delivered) + median(&mut ahead);
    let report = json!({
        "reported_latency_ms_p50": reported_ms,
        "page_latency_ms_p50": median(&mut own),
        "delivery_ms_p50": median(&mut delivered),
        "buffer_ahead_ms_p50": median(&mut ahead),
        "independent_ms": independent_ms,
        "reported_samples": reported,
    });
    let path = artifacts_dir().join("control-latency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    eprintln!("latency report vs independent measure: {report}");
    assert!(
        (reported_ms - independent_ms).abs() <= 30.0,
        "reported {reported_ms} ms vs independent {independent_ms} ms: {report}"
    );
    b.close().await.expect("close chromium");
}

#[tokio::test]
async fn synchronized_viewers_show_the_same_frame() {
    const SYNC_MS: f64 = 400.0;
    let dir = tempdir();
    let config = dir.join("onair.toml");
    std::fs::write(
        &config,
        format!("[streams.together]\nsync = true\nlatency_ms = {SYNC_MS}\n"),
    )
    .expect("write config");
    let config = config.to_string_lossy().to_string();
    let server = Server::start(&["--config", &config]).await;
    // Small frames and no audio: two browsers on a 2-core machine must not starve each other.
    // With audio, headless Chromium under that load now and then stalls its audio clock for
    // 40-110 ms; sync then recovers within a second or two (measured; see docs/benchmarks.md).
    let small = Profile {
        width: 320,
        height: 240,
        audio: false,
        ..Profile::default()
    };
    let _publisher = Publisher::start(&server.rtmp_url("together"), small);

    // Two separate browser sessions, asking for very different latencies of their own: the
    // stream's sync setting overrides both.
    let a = open_watch(&server, "together", "?latency=150").await;
    let b = open_watch(&server, "together", "?latency=1500").await;
    let synced = format!(
        "s.sync === true && s.targetLatencyMs === {SYNC_MS} && s.state === 'playing' && \
         Math.abs(s.latencyMs - {SYNC_MS}) < 25"
    );
    for (page, name) in [(&a, "a"), (&b, "b")] {
        wait_stats(page, &synced, Duration::from_secs(40), name).await;
    }

    // 10 s of pairs sampled at once from both pages: the server ingest time of what each shows,
    // against the shared wall clock (same machine), brought to a common instant.
    let js = "return { ingest: window.onairPlayer.stats().ingestMs, wall: Date.now() };";
    let mut diffs = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let (sa, sb) = tokio::join!(a.eval(js), b.eval(js));
        let (sa, sb) = (sa.expect("sample a"), sb.expect("sample b"));
        // wall − ingest: how far behind the ingest clock each page is; equal when in sync.
        let behind = |s: &Value| num(s, "wall") - num(s, "ingest");
        diffs.push(behind(&sa) - behind(&sb));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let worst = diffs.iter().fold(0.0f64, |m, d| m.max(d.abs()));
    let report = json!({ "sync_latency_ms": SYNC_MS, "diffs_ms": diffs, "worst_ms": worst });
    let path = artifacts_dir().join("control-sync.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    eprintln!("synchronized playback: {report}");
    assert!(diffs.len() >= 20, "{report}");
    assert!(
        worst <= 50.0,
        "the two viewers drifted {worst} ms apart: {report}"
    );
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

#[tokio::test]
async fn dashboard_shows_the_viewers_and_draws_the_charts() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(&server.rtmp_url("cam"), Profile::default());
    // 20 viewers: one Chromium player, 19 WebSocket clients that keep reading.
    let watcher = open_watch(&server, "cam", "").await;
    wait_stats(
        &watcher,
        "s.state === 'playing' && s.latencyMs > 0",
        T,
        "the Chromium viewer playing",
    )
    .await;
    let mut readers = Vec::new();
    for _ in 0..19 {
        let mut v = Viewer::connect(&server.ws_url("cam")).await;
        v.recv(T).await;
        readers.push(v.drain());
    }
    assert_eq!(server.api("/api/streams").await[0]["viewers"], 20);
    // Once the server's snapshot has them all and the player's report, open the dashboard.
    // Two such seconds, so that each chart has a line to draw, not a lone point.
    let mut feed = Feed::open(&server.http, "").await;
    for _ in 0..2 {
        feed.snapshot_where(T, "20 viewers, one reporting", |s| {
            s["totals"]["viewers"] == 20 && s["totals"]["latency_ms"]["reporting"] == 1
        })
        .await;
    }

    let dash = Browser::start().await.expect("start chromium");
    let opened = Instant::now();
    dash.goto(&format!("http://{}/dashboard", server.http))
        .await
        .expect("open the dashboard");
    let left = Duration::from_secs(3).saturating_sub(opened.elapsed());
    let shown = dash
        .wait_for(
            "(() => { const d = window.onairDashboard;                const total = document.getElementById('viewers-total').textContent.trim();                const rows = document.querySelectorAll('#viewer-rows tr').length;                const streams = document.getElementById('stream-rows').textContent;                const s = { snapshots: d ? d.snapshots : 0, total, rows, streams };                if (s.snapshots >= 1 && total === '20' && rows === 20) return s;                throw new Error(JSON.stringify(s)); })()",
            left,
            "the dashboard showing 20 viewers",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let within = opened.elapsed();
    assert!(
        shown["streams"].as_str().is_some_and(|t| t.contains("cam")),
        "{shown}"
    );
    dash.screenshot("dashboard").await.expect("screenshot");
    // Each chart, as pixels: coloured lines over the dark background and grey axes.
    let mut drawn = serde_json::Map::new();
    for id in ["chart-viewers", "chart-bitrate", "chart-latency"] {
        dash.eval(&format!(
            "document.getElementById('{id}').scrollIntoView(); return true;"
        ))
        .await
        .expect("scroll to the chart");
        let shot = dash
            .screenshot_element(&format!("#{id}"), &format!("dashboard-{id}"))
            .await
            .expect("screenshot a chart");
        // The plot area (the legend, with its coloured squares, is the bottom quarter).
        let plot = shot
            .crop(0, 0, shot.width, shot.height * 3 / 4)
            .expect("crop the plot area");
        let lines = (plot.fraction_colored(60) * f64::from(plot.width * plot.height)) as u64;
        drawn.insert(id.into(), json!(lines));
        assert!(
            lines >= 200,
            "{id}: no chart drawn ({lines} coloured pixels in the plot area): {}",
            shot.path.display()
        );
    }
    eprintln!("dashboard: 20 viewers shown {within:?} after opening; charts {drawn:?}");
    for r in readers {
        r.abort();
    }
    dash.close().await.expect("close the dashboard");
    watcher.close().await.expect("close the viewer");
}

/// A fresh directory under the test artifacts, for config files.
fn tempdir() -> std::path::PathBuf {
    let dir = artifacts_dir().join(format!("control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    dir
}
