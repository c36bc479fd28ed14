//! Enhanced RTMP from a current ffmpeg (9, from PyPI): what is carried and what is refused with
//! a reason, until HEVC, AV1 and extra video tracks become renditions (the ingest issue). Of
//! several audio tracks, the default one is the stream's.

use std::time::Duration;

use onair_protocol::wire::{Message, TrackParams};
use onair_tests::{Server, Viewer, ffmpeg9};

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
        .wait_log(&format!("left out: {kind} tracks beside"), T)
        .await;
    assert!(line.contains("track=1"), "{line}");
    assert_eq!(
        server
            .log_matching(&format!("left out: {kind} tracks"))
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
async fn a_two_track_publish_plays_its_default_track() {
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
    let mut viewer = Viewer::connect(&server.ws_url("two")).await;
    let got = viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let size = got.iter().find_map(|r| match r.msg() {
        Message::Init(init) => init.tracks.iter().find_map(|t| match t.params {
            TrackParams::Video { width, height, .. } => Some((width, height)),
            _ => None,
        }),
        _ => None,
    });
    assert_eq!(size, Some((640, 360)), "the default track is the stream");
    // Two seconds later it still plays: the second track's messages did not end it.
    let from = std::time::Instant::now();
    let mut frames = 0;
    while from.elapsed() < Duration::from_secs(2) {
        let r = viewer.recv(T).await;
        if matches!(r.msg(), Message::Media { .. }) {
            frames += 1;
        }
    }
    assert!(frames > 30, "{frames} frames in 2 s");
    second_track_left_out(&server, "video").await;
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

#[tokio::test]
async fn hevc_and_av1_publishes_are_refused_with_the_reason() {
    let server = Server::start(&[]).await;
    for (codec, args) in [
        (
            "HEVC",
            &["-c:v", "libx265", "-x265-params", "log-level=none"][..],
        ),
        ("AV1", &["-c:v", "libsvtav1", "-preset", "12"][..]),
    ] {
        let from = server.log_lines();
        let mut ffmpeg = publish(args, &server.rtmp_url(&codec.to_lowercase()));
        let status = tokio::time::timeout(T, ffmpeg.wait())
            .await
            .expect("ffmpeg ends once refused")
            .expect("wait ffmpeg");
        assert!(!status.success(), "{codec}: ffmpeg should fail");
        server
            .wait_log_since(
                from,
                &format!(
                    "unsupported video codec: {codec} (Enhanced RTMP): only H.264 is carried yet"
                ),
                T,
            )
            .await;
    }
}
