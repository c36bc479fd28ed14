//! Enhanced RTMP multitrack from a current ffmpeg (9, from PyPI): the default video track is the
//! stream until extra video tracks become renditions, and of several audio tracks the default
//! one is the stream's. (HEVC, AV1 and VP9: tests/codecs.rs.)

use std::time::Duration;

use onair_protocol::wire::{Message, TrackParams};
use onair_tests::{Server, Viewer, ffmpeg9, start_of};

const T: Duration = Duration::from_secs(20);

fn publish(args: &[&str], url: &str) -> tokio::process::Child {
    tokio::process::Command::new(ffmpeg9())
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(args)
        .args(["-f", "flv", url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ffmpeg 9")
}

/// The server said once that it left track 1 of `kind` out, and counted its packets (two
/// seconds of them at least, as the callers have played).
async fn second_track_left_out(server: &Server, kind: &str) {
    let line = server
        .wait_log(&format!("left out: {kind} track packets"), T)
        .await;
    assert!(line.contains("track=1"), "{line}");
    assert_eq!(
        server
            .log_matching(&format!("left out: {kind} track packets"))
            .len(),
        1,
        "said once"
    );
    let (_, metrics) = onair_tests::http_get(&server.http, "/metrics")
        .await
        .expect("GET /metrics");
    let sample = format!("onair_ingest_tracks_left_out_total{{kind=\"{kind}\"}}");
    let left_out = onair_tests::metric(&metrics, &sample).unwrap_or(0.0);
    assert!(
        left_out > 30.0,
        "the second track's packets counted: {left_out}"
    );
}

#[tokio::test]
async fn a_two_track_publish_makes_two_renditions() {
    let server = Server::start(&[]).await;
    // Two video tracks, as OBS's Enhanced Broadcasting sends them: ffmpeg writes the first as
    // a legacy tag and the second as an Enhanced RTMP multitrack (OneTrack) message.
    let mut ffmpeg = publish(
        &[
            "-filter_complex",
            "[0:v]split=2[a][b];[b]scale=320:180[c]",
            "-map",
            "[a]",
            "-map",
            "[c]",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-g",
            "30",
            "-c:a",
            "aac",
        ],
        &server.rtmp_url("two"),
    );
    let line = server
        .wait_log("multitrack: video track 1 is a rendition", T)
        .await;
    assert!(line.contains("rendition=\"180p\""), "{line}");
    let is_media = |m: &Message<'_>| matches!(m, Message::Media { .. });
    // A pinned viewer of each: keyframe first, at its own size, frames continuous.
    for (name, size) in [("source", (640, 360)), ("180p", (320, 180))] {
        let mut viewer =
            Viewer::connect(&format!("{}?rendition={name}", server.ws_url("two"))).await;
        let got = viewer.recv_until(T, is_media).await;
        let start = start_of(&got);
        assert_eq!(start.size, size, "{name}");
        assert!(start.keyframe_first, "{name}: keyframe first");
        assert!(
            start.audio,
            "{name}: the stream's audio goes with every track"
        );
        let frames = viewer.continuous_video(Duration::from_secs(2), None).await;
        assert!(frames > 45, "{name}: {frames} frames in 2 s");
    }
    let (_, body) = onair_tests::http_get(&server.http, "/api/streams/two")
        .await
        .expect("GET /api/streams/two");
    let api: serde_json::Value = serde_json::from_str(&body).expect("json");
    let renditions: Vec<(String, u64)> = api["renditions"]
        .as_array()
        .expect("renditions")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["height"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        renditions,
        [("source".to_string(), 360), ("180p".to_string(), 180)],
        "the tracks are the renditions (no ladder beside them): {api}"
    );
    // Moved from one track to the other (the switch automatic choice makes too): the other's
    // init, then its frames from a keyframe, dts continuing.
    let mut viewer = Viewer::connect(&server.ws_url("two")).await;
    let got = viewer.recv_until(T, is_media).await;
    let at = start_of(&got).rendition;
    let last = got.iter().rev().find_map(|r| match r.msg() {
        Message::Media { header, .. } if header.track == 0 => Some(header.dts),
        _ => None,
    });
    let other = if at == 0 { 1 } else { 0 };
    viewer
        .send(&Message::Control(
            onair_protocol::wire::Control::SwitchRendition(other),
        ))
        .await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Init(i) if i.rendition == other))
        .await;
    let last = got
        .iter()
        .rev()
        .find_map(|r| match r.msg() {
            Message::Media { header, .. } if header.track == 0 => Some(header.dts),
            _ => None,
        })
        .or(last);
    let next = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let Message::Media { header, .. } = next.last().expect("video").msg() else {
        unreachable!("recv_until stops at video")
    };
    assert!(header.keyframe, "the switch lands on a keyframe");
    assert!(
        last.is_none_or(|l| header.dts > l),
        "no overlap: {} after {last:?}",
        header.dts
    );
    let last = Some(header.dts);
    assert!(viewer.continuous_video(Duration::from_secs(1), last).await > 20);
    assert!(
        ffmpeg.try_wait().expect("ffmpeg state").is_none(),
        "ffmpeg still publishing"
    );
}

#[tokio::test]
async fn a_two_audio_track_publish_plays_its_default_audio() {
    let server = Server::start(&[]).await;
    let mut ffmpeg = publish(
        &[
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=880:sample_rate=48000",
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-map",
            "2:a",
            "-c:v",
            "libx264",
            "-g",
            "30",
            "-c:a",
            "aac",
        ],
        &server.rtmp_url("two-audio"),
    );
    let mut viewer = Viewer::connect(&server.ws_url("two-audio")).await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    let audio = got.iter().find_map(|r| match r.msg() {
        Message::Init(init) => init.tracks.iter().find_map(|t| match t.params {
            TrackParams::Audio { sample_rate, .. } => Some((t.id, sample_rate)),
            _ => None,
        }),
        _ => None,
    });
    let (audio_id, rate) = audio.expect("an audio track in the init");
    assert_eq!(
        rate, 44100,
        "the first audio track, not the second (48 kHz)"
    );
    let from = std::time::Instant::now();
    let mut audio_frames = 0;
    while from.elapsed() < Duration::from_secs(2) {
        if let Message::Media { header, .. } = viewer.recv(T).await.msg()
            && header.track == audio_id
        {
            audio_frames += 1;
        }
    }
    // 44.1 kHz AAC: 43 frames a second, of the one track.
    assert!(
        (60..=110).contains(&audio_frames),
        "{audio_frames} audio frames in 2 s"
    );
    second_track_left_out(&server, "audio").await;
    assert!(
        ffmpeg.try_wait().expect("ffmpeg state").is_none(),
        "ffmpeg still publishing"
    );
}
