//! Renditions with a real ffmpeg ladder: a 720p publish gets a 480p and a 240p rung, each a
//! rendition a WebSocket viewer can pin (`?rendition=NAME`) or switch to (`SwitchRendition`),
//! keyframes at the same dts in every rendition, also after the ladder's ffmpeg is killed and
//! after a republish at another size.

use std::collections::BTreeSet;
use std::time::Duration;

use onair_protocol::wire::{Control, Message};
use onair_tests::{Profile, Publisher, Recording, Server, Viewer, ffmpeg_decode_errors};

const T: Duration = Duration::from_secs(30);

fn config(toml: &str) -> String {
    let dir =
        onair_tests::browser::artifacts_dir().join(format!("renditions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let path = dir.join("ladder.toml");
    std::fs::write(&path, toml).expect("write config");
    path.to_string_lossy().to_string()
}

/// Waits until the stream lists renditions of exactly these heights (highest first), each with
/// an init; returns their (name, id).
async fn wait_for_renditions(server: &Server, stream: &str, heights: &[u64]) -> Vec<(String, u8)> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        // 404 until the publisher is in.
        let (status, body) = onair_tests::http_get(&server.http, &format!("/api/streams/{stream}"))
            .await
            .expect("GET the stream");
        let detail: serde_json::Value = if status == 200 {
            serde_json::from_str(&body).expect("JSON")
        } else {
            serde_json::Value::Null
        };
        let list = detail["renditions"].as_array().cloned().unwrap_or_default();
        let mut got: Vec<(u64, String, u8)> = list
            .iter()
            .filter_map(|r| {
                Some((
                    r["height"].as_u64()?,
                    r["name"].as_str()?.to_string(),
                    r["id"].as_u64()? as u8,
                ))
            })
            .collect();
        got.sort_by_key(|g| std::cmp::Reverse(g.0));
        if got.iter().map(|g| g.0).collect::<Vec<_>>() == heights
            && list
                .iter()
                .all(|r| r["codec"].as_str().is_some_and(|c| !c.is_empty()))
        {
            return got.into_iter().map(|(_, n, id)| (n, id)).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "renditions of {stream} never became {heights:?}: {detail}"
        );
        // The API is polled: nothing outside the server can be told when a rung starts.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A viewer pinned to `rendition`, recording `frames` video frames.
async fn watch(server: &Server, stream: &str, rendition: &str, frames: usize) -> Recording {
    let url = format!("{}?rendition={rendition}", server.ws_url(stream));
    let mut viewer = Viewer::connect(&url).await;
    let mut rec = Recording::default();
    while rec.video_frames.len() < frames {
        rec.push(&viewer.recv(T).await);
    }
    rec
}

fn keyframes(rec: &Recording) -> BTreeSet<u64> {
    rec.video_frames
        .iter()
        .filter(|f| f.2)
        .map(|f| f.0)
        .collect()
}

/// Every rendition's keyframes, within the span all of them cover, sit at the same dts (±1 ms).
fn assert_aligned(recs: &[(&str, &Recording)]) {
    let lo = recs
        .iter()
        .map(|(_, r)| r.video_frames[0].0)
        .max()
        .expect("recordings");
    let hi = recs
        .iter()
        .map(|(_, r)| r.video_frames.last().map_or(0, |f| f.0))
        .min()
        .expect("recordings");
    let (first_name, first) = recs[0];
    let reference: Vec<u64> = keyframes(first)
        .into_iter()
        .filter(|k| (lo..=hi).contains(k))
        .collect();
    assert!(
        reference.len() >= 2,
        "{first_name}: too few keyframes in the common span {lo}..{hi}"
    );
    for (name, rec) in &recs[1..] {
        let ks: Vec<u64> = keyframes(rec)
            .into_iter()
            .filter(|k| (lo..=hi).contains(k))
            .collect();
        assert_eq!(
            ks.len(),
            reference.len(),
            "{name} vs {first_name}: {ks:?} / {reference:?}"
        );
        for (a, b) in ks.iter().zip(&reference) {
            assert!(
                a.abs_diff(*b) <= 1,
                "{name} keyframe at {a}, {first_name} at {b}"
            );
        }
    }
}

/// Pinned viewers of every rendition: the configured height, a keyframe first, no lost frame,
/// decodable, and keyframes aligned.
async fn check_every_rendition(server: &Server, stream: &str, expect: &[(&str, u32)]) {
    // All at once, so that their recordings cover the same stretch of the stream.
    let recorded = futures_util::future::join_all(
        expect
            .iter()
            .map(|&(name, _)| watch(server, stream, name, 90)),
    )
    .await;
    let mut recs = Vec::new();
    for (&(name, height), rec) in expect.iter().zip(recorded) {
        let info = rec.video.as_ref().expect("video init");
        assert_eq!(info.height, height, "{name}");
        assert_eq!(rec.first_media_was_keyframe, Some(true), "{name}");
        rec.assert_video_continuous(40);
        let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
        assert!(errors.is_empty(), "{name}: ffmpeg: {errors}");
        recs.push((name, rec));
    }
    let refs: Vec<(&str, &Recording)> = recs.iter().map(|(n, r)| (*n, r)).collect();
    assert_aligned(&refs);
}

fn hd() -> Profile {
    Profile {
        width: 1280,
        height: 720,
        gop: 30,
        ..Profile::default()
    }
}

#[tokio::test]
async fn a_ladder_makes_aligned_renditions_that_viewers_pin_and_switch_between() {
    let config = config("[streams.lad]\nladder = [\"480p\", \"240p\"]\n");
    let server = Server::start(&["--config", &config]).await;
    let publisher = Publisher::start(&server.rtmp_url("lad"), hd());
    let ids = wait_for_renditions(&server, "lad", &[720, 480, 240]).await;
    check_every_rendition(
        &server,
        "lad",
        &[("source", 720), ("480p", 480), ("240p", 240)],
    )
    .await;

    // A viewer on the source asks for the 240p rung: it gets that init, then frames from a
    // keyframe, with no hole and no overlap in dts.
    let low = ids.iter().find(|(n, _)| n == "240p").expect("240p").1;
    let mut viewer = Viewer::connect(&server.ws_url("lad")).await;
    let mut rec = Recording::default();
    while rec.video_frames.len() < 30 {
        rec.push(&viewer.recv(T).await);
    }
    assert_eq!(rec.video.as_ref().map(|v| v.height), Some(720));
    // On automatic (the default) with three renditions: asked for receipts 4 times a second.
    assert_eq!(rec.receipts_asked, [250], "receipts asked for");
    viewer
        .send(&Message::Control(Control::SwitchRendition(low)))
        .await;
    let before = rec.video_frames.len();
    loop {
        let got = viewer.recv(T).await;
        let is_init = matches!(got.msg(), Message::Init(ref i) if i.rendition == low);
        rec.push(&got);
        if is_init {
            break;
        }
        assert!(
            rec.video_frames.len() < before + 150,
            "no switch within 5 s of frames"
        );
    }
    let switched_at = rec.video_frames.len();
    while rec.video_frames.len() < switched_at + 30 {
        rec.push(&viewer.recv(T).await);
    }
    assert_eq!(rec.video.as_ref().map(|v| v.height), Some(240));
    // Pinned now: asked to stop them.
    assert_eq!(
        rec.receipts_asked,
        [250, 0],
        "receipts asked for, then stopped"
    );
    assert!(
        rec.video_frames[switched_at].2,
        "the first frame after the switch is a keyframe"
    );
    rec.assert_video_continuous(40);
    let errors = ffmpeg_decode_errors("h264", &rec.h264).await;
    assert!(errors.is_empty(), "across the switch: ffmpeg: {errors}");
    let detail = server.api("/api/streams/lad").await;
    let me = detail["viewers"]["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["rendition"] == low))
        .cloned()
        .unwrap_or_default();
    assert_eq!(me["switches"], 1, "{detail}");
    assert_eq!(me["last_switch"], "requested", "{detail}");
    assert_eq!(detail["transcoder"]["running"], true, "{detail}");

    // The ladder's ffmpeg dies: it is restarted, and the rungs line up again.
    let killed = std::process::Command::new("pkill")
        .args(["-f", &format!("onair-ladder-{}-lad-", server.pid())])
        .status()
        .expect("pkill");
    assert!(killed.success(), "an ffmpeg child to kill");
    server
        .wait_log("ladder: ffmpeg failed; restarting", T)
        .await;
    wait_for_renditions(&server, "lad", &[720, 480, 240]).await;
    check_every_rendition(
        &server,
        "lad",
        &[("source", 720), ("480p", 480), ("240p", 240)],
    )
    .await;
    let detail = server.api("/api/streams/lad").await;
    assert!(
        detail["transcoder"]["restarts"].as_u64() >= Some(1),
        "{detail}"
    );

    // A republish at 854x480: the 480p rung is not below the source any more.
    publisher.kill().await;
    let _again = Publisher::start(
        &server.rtmp_url("lad"),
        Profile {
            width: 854,
            height: 480,
            ..hd()
        },
    );
    wait_for_renditions(&server, "lad", &[480, 240]).await;
    check_every_rendition(&server, "lad", &[("source", 480), ("240p", 240)]).await;
}
