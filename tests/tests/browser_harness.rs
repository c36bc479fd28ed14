//! Self-test of the browser harness (src/browser.rs): real headless Chromium through
//! chromedriver, against a page served by a tiny loopback responder. Checks scripts, waiting,
//! console capture, screenshots and their pixel statistics, two browsers at once, clean shutdown,
//! and that this Chromium can play what the player feeds it (H.264 + AAC through MSE).

use std::time::{Duration, Instant};

use onair_tests::browser::{Browser, processes_using};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A 256×256 canvas with a red/green gradient, a 256×128 black block under it, a console
/// message at load, and `window.later` set 300 ms after load.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title>
<style>body { margin: 0; background: #fff; } #grad, #black { display: block; }</style>
</head><body>
<canvas id="grad" width="256" height="256"></canvas>
<div id="black" style="width: 256px; height: 128px; background: #000"></div>
<script>
  const ctx = document.getElementById('grad').getContext('2d');
  const img = ctx.createImageData(256, 256);
  for (let y = 0; y < 256; y++) {
    for (let x = 0; x < 256; x++) {
      const i = (y * 256 + x) * 4;
      img.data[i] = x; img.data[i + 1] = y; img.data[i + 2] = 128; img.data[i + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  console.log('harness page loaded', 42);
  console.error('harness error line');
  setTimeout(() => { window.later = 'ready'; }, 300);
</script>
</body></html>"#;

/// Serves `PAGE` for every request on an ephemeral loopback port; returns its base URL.
async fn serve_page() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if req.starts_with(b"GET /favicon.ico") {
                    ("404 Not Found", "")
                } else {
                    ("200 OK", PAGE)
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_harness() {
    let t0 = Instant::now();
    let url = serve_page().await;

    // Two browsers at once: separate chromedrivers, ports and profiles.
    let (a, b) = tokio::join!(Browser::start(), Browser::start());
    let a = a.expect("start browser a");
    let b = b.expect("start browser b");
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    eprintln!("two browsers up in {:?}", t0.elapsed());

    let (ra, rb) = tokio::join!(a.goto(&url), b.goto(&url));
    ra.expect("a: goto");
    rb.expect("b: goto");

    // eval: synchronous script; a returned promise is awaited.
    assert_eq!(a.eval("return 6 * 7").await.expect("eval"), json!(42));
    assert_eq!(
        a.eval("return document.title").await.expect("eval"),
        json!("harness")
    );
    assert_eq!(
        a.eval("return Promise.resolve('p')")
            .await
            .expect("eval promise"),
        json!("p")
    );
    let err = a
        .eval("throw new Error('boom')")
        .await
        .expect_err("a throw");
    eprintln!("script error: {err}");
    assert!(err.to_string().contains("boom"), "{err}");
    // eval_async: the callback is the last argument.
    assert_eq!(
        a.eval_async(
            "const done = arguments[arguments.length - 1]; setTimeout(() => done('later'), 50);"
        )
        .await
        .expect("eval_async"),
        json!("later")
    );
    // A script that never calls back ends with the timeout given, not chromedriver's default.
    let started = Instant::now();
    let err = a
        .eval_async_with("/* never calls back */", vec![], Duration::from_millis(300))
        .await
        .expect_err("script timeout");
    eprintln!("script timeout error: {err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert!(err.to_string().contains("timeout"), "{err}");
    // ...and the session still works afterwards, with the default timeout back.
    assert_eq!(
        a.eval_async_with(
            "arguments[arguments.length - 1](arguments[0] + 1)",
            vec![json!(1)],
            Duration::from_secs(5)
        )
        .await
        .expect("eval_async_with"),
        json!(2)
    );

    // wait_for: a value set by a timer in the page.
    let v = a
        .wait_for("window.later", Duration::from_secs(5), "window.later")
        .await
        .expect("wait_for");
    assert_eq!(v, json!("ready"));
    // An expression that throws until it holds is "not yet", not an error.
    let v = a
        .wait_for(
            "document.getElementById('grad').width === 256 && undefinedThing === undefined",
            Duration::from_millis(300),
            "a condition that throws",
        )
        .await
        .expect_err("a condition that always throws times out");
    let msg = v.to_string();
    assert!(msg.contains("a condition that throws"), "{msg}");
    assert!(
        msg.contains("undefinedThing"),
        "last value shows the throw: {msg}"
    );
    // wait_for returns the truthy value.
    let v = a
        .wait_for(
            "document.querySelectorAll('canvas').length * 10",
            Duration::from_millis(500),
            "a canvas",
        )
        .await
        .expect("ten is truthy");
    assert_eq!(v, json!(10));
    // A condition that never holds: the error names it and shows the last value and console.
    let started = Instant::now();
    let err = a
        .wait_for(
            "window.never === true || document.querySelectorAll('canvas').length - 1",
            Duration::from_millis(500),
            "window.never",
        )
        .await
        .expect_err("wait_for must time out");
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!("wait_for timeout error:\n{msg}");
    assert!(msg.contains("window.never"), "names what: {msg}");
    assert!(msg.contains("last value: 0"), "shows the last value: {msg}");
    assert!(
        msg.contains("harness page loaded"),
        "shows the console: {msg}"
    );
    assert!(took < Duration::from_secs(4), "timed out late: {took:?}");

    // Console capture, including what was logged during the load and across reads.
    let log = a.console_log().await.expect("console log");
    assert!(
        log.iter()
            .any(|e| e.message.contains("harness page loaded") && e.message.contains("42")),
        "console.log captured: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e.level == "SEVERE" && e.message.contains("harness error line")),
        "console.error captured: {log:#?}"
    );
    a.eval("console.log('after load'); return null")
        .await
        .expect("eval");
    let log = a.console_log().await.expect("console log");
    assert!(
        log.iter()
            .any(|e| e.message.contains("harness page loaded"))
    );
    assert!(log.iter().any(|e| e.message.contains("after load")));

    // Screenshots: a viewport one, cropped, and one of an element.
    let shot = a
        .screenshot("browser_harness_viewport")
        .await
        .expect("screenshot");
    assert!(shot.path.is_file(), "{}", shot.path.display());
    assert_eq!((shot.width, shot.height), (1280, 800), "viewport size");
    assert_eq!(
        a.element_rect("#grad").await.expect("rect"),
        (0, 0, 256, 256)
    );
    assert_eq!(
        a.element_rect("#black").await.expect("rect"),
        (0, 256, 256, 128)
    );
    let canvas = shot.crop(0, 0, 256, 256).expect("crop canvas");
    let black = shot.crop(0, 256, 256, 128).expect("crop black");
    let white = shot.crop(400, 0, 400, 400).expect("crop background");
    eprintln!(
        "canvas: {} colours, luma sd {:.1}, mean {:?}; black: {} colours, non-black {:.3}",
        canvas.distinct_colors(),
        canvas.luma_stddev(),
        canvas.mean_rgb(),
        black.distinct_colors(),
        black.fraction_non_black(16)
    );
    assert!(
        canvas.distinct_colors() >= 200,
        "{}",
        canvas.distinct_colors()
    );
    assert!(canvas.luma_stddev() > 30.0, "{}", canvas.luma_stddev());
    assert!(canvas.fraction_non_black(16) > 0.9);
    let [r, g, bl] = canvas.mean_rgb();
    assert!((r - 127.5).abs() < 8.0 && (g - 127.5).abs() < 8.0 && (bl - 128.0).abs() < 8.0);
    assert!(black.distinct_colors() <= 2, "{}", black.distinct_colors());
    assert!(black.luma_stddev() < 1.0);
    assert!(black.fraction_non_black(16) < 0.01);
    assert_eq!(white.distinct_colors(), 1);
    assert!(white.mean_rgb().iter().all(|&c| c > 250.0));
    assert!(
        shot.crop(1200, 700, 100, 100).is_err(),
        "crop outside fails"
    );

    let el = a
        .screenshot_element("#grad", "browser_harness_canvas")
        .await
        .expect("element screenshot");
    assert_eq!((el.width, el.height), (256, 256));
    assert!(el.distinct_colors() >= 200);
    assert!(el.path.ends_with("browser_harness_canvas.png"));

    // The player's codecs, through MSE, in this Chromium.
    let mse = b
        .eval(
            r#"return {
                mse: typeof MediaSource === 'function',
                avc: MediaSource.isTypeSupported('video/mp4; codecs="avc1.64001f"'),
                aac: MediaSource.isTypeSupported('audio/mp4; codecs="mp4a.40.2"'),
                both: MediaSource.isTypeSupported('video/mp4; codecs="avc1.64001f,mp4a.40.2"'),
            }"#,
        )
        .await
        .expect("MSE support");
    eprintln!("MSE support: {mse}");
    assert_eq!(
        mse,
        json!({"mse": true, "avc": true, "aac": true, "both": true}),
        "headless Chromium must decode H.264 and AAC through MSE"
    );

    // Shutdown: close() ends the session in order, drop kills; neither leaves a process (nor the
    // watchdog, whose command line names the folder too) behind.
    let (dir_a, dir_b) = (a.dir().to_path_buf(), b.dir().to_path_buf());
    assert!(
        processes_using(&dir_a.join("profile")).len() > 1,
        "Chromium's processes run with a's profile"
    );
    a.close().await.expect("close a");
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(processes_using(&dir_a).is_empty() && processes_using(&dir_b).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "processes left behind: {:?} {:?}",
            processes_using(&dir_a),
            processes_using(&dir_b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !dir_a.exists() && !dir_b.exists(),
        "temporary folders removed"
    );
    eprintln!("browser harness self-test took {:?}", t0.elapsed());
}
