//! The control plane without a browser: the REST API's mutating calls (refused without the admin
//! token), `DELETE /api/streams/NAME` disconnecting a real ffmpeg publisher, `DELETE
//! /api/viewers/ID`, viewer counts that agree between the hub, `/api/streams` and `/metrics`,
//! viewer reports flowing into the aggregates, and malformed viewer messages closed with a
//! reason without touching anyone else's stats.

use std::time::Duration;

use onair_protocol::wire::{
    self, Control, MediaHeader, Message, ServerStats, StatusCode, TimeSyncRequest, ViewerStats,
};
use onair_tests::{Feed, Profile, Publisher, Server, Viewer, http_get, http_request, metric};
use serde_json::Value;

const T: Duration = Duration::from_secs(15);
const TOKEN: &str = "test-token-0123456789abcdef";

#[tokio::test]
async fn delete_without_a_configured_token_is_refused() {
    let server = Server::start(&[]).await;
    let (status, body) = http_request(
        &server.http,
        "DELETE",
        "/api/streams/any",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    )
    .await
    .expect("request");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("ONAIR_ADMIN_TOKEN"), "{body}");
}

#[tokio::test]
async fn delete_disconnects_the_publisher_only_with_the_token() {
    let server = Server::start_with_env(&[], &[("ONAIR_ADMIN_TOKEN", TOKEN)]).await;
    let publisher = Publisher::start(&server.rtmp_url("ops"), Profile::default());
    let mut viewer = Viewer::connect(&server.ws_url("ops")).await;
    viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;

    // No credential (a token without the Bearer scheme is none) is 401, a wrong one 403.
    for (auth, want) in [
        (None, 401),
        (Some("Bearer wrong-token-0123456789ab"), 403),
        (Some(TOKEN), 401),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, body) = http_request(&server.http, "DELETE", "/api/streams/ops", &headers)
            .await
            .expect("request");
        assert_eq!(status, want, "{auth:?}: {body}");
    }
    assert_eq!(server.api("/api/streams/ops").await["live"], true);

    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (status, body) = http_request(&server.http, "DELETE", "/api/streams/ops", &auth)
        .await
        .expect("request");
    assert_eq!(status, 204, "{body}");

    // ffmpeg is told and exits; the viewer stays connected and is told the stream waits.
    let (exit, _) = publisher.wait_exit(T).await;
    assert!(
        !exit.success(),
        "ffmpeg should fail when its publish is removed"
    );
    viewer
        .recv_until(
            T,
            |m| matches!(m, Message::Status(s) if s.code == StatusCode::Waiting),
        )
        .await;
    assert_eq!(server.api("/api/streams/ops").await["live"], false);

    let (status, _) = http_request(&server.http, "DELETE", "/api/streams/ops", &auth)
        .await
        .expect("request");
    assert_eq!(status, 404, "nothing left to disconnect");
}

async fn metrics(server: &Server) -> String {
    let (status, body) = http_get(&server.http, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn stream<'a>(snapshot: &'a Value, name: &str) -> &'a Value {
    snapshot["streams"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Connects a viewer and reads up to its first media frame; returns it with its id (from hello).
async fn viewer(server: &Server, name: &str) -> (Viewer, u64) {
    let mut v = Viewer::connect(&server.ws_url(name)).await;
    let got = v
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    let id = got
        .iter()
        .find_map(|r| match r.msg() {
            Message::Hello(h) => Some(h.viewer_id),
            _ => None,
        })
        .expect("hello first");
    (v, id)
}

fn report(latency_ms: u32) -> ViewerStats {
    ViewerStats {
        latency_ms,
        buffer_ms: 150,
        decoded_frames: 300,
        dropped_frames: 1,
        stalls: 0,
        bandwidth_kbps: 1200,
        rendition: 0,
        state: wire::PLAYER_PLAYING,
    }
}

/// Sends a report and returns the server's answer to it.
async fn send_report(v: &mut Viewer, stats: ViewerStats) -> ServerStats {
    v.send(&Message::ViewerStats(stats)).await;
    let got = v
        .recv_until(T, |m| matches!(m, Message::ServerStats(_)))
        .await;
    match got.last().map(|r| r.msg()) {
        Some(Message::ServerStats(s)) => s,
        other => panic!("expected server stats, got {other:?}"),
    }
}

#[tokio::test]
async fn api_and_metrics_count_what_the_hub_has_and_viewers_can_be_removed() {
    let server = Server::start_with_env(&[], &[("ONAIR_ADMIN_TOKEN", TOKEN)]).await;
    let _publisher = Publisher::start(&server.rtmp_url("cam"), Profile::default());
    let (mut reporter, reporter_id) = viewer(&server, "cam").await;
    let mut others = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (v, id) = viewer(&server, "cam").await;
        ids.push(id);
        others.push(v.drain());
    }

    // Counts are read from the hub on each request: no waiting for a stats period.
    let list = server.api("/api/streams").await;
    assert_eq!(list[0]["name"], "cam");
    assert_eq!(list[0]["viewers"], 5, "{list}");
    let text = metrics(&server).await;
    assert_eq!(metric(&text, "onair_viewers"), Some(5.0), "{text}");
    assert_eq!(
        metric(&text, "onair_stream_viewers{stream=\"cam\"}"),
        Some(5.0)
    );
    assert_eq!(metric(&text, "onair_streams_live"), Some(1.0));
    assert!(metric(&text, "onair_ingest_bytes_total").is_some_and(|b| b > 0.0));

    // A report is answered with what the server measured about this viewer.
    let answer = send_report(&mut reporter, report(240)).await;
    assert!(answer.bytes_sent > 0, "{answer:?}");
    assert_eq!(answer.keyframe_skips, 0);

    // The dashboard feed: aggregates from the report, rates from the hub.
    let mut feed = Feed::open(&server.http, "stream=cam&sort=id&limit=3").await;
    let (event, history) = feed.next(T).await;
    assert_eq!(event, "history", "{history}");
    let snap = feed
        .snapshot_where(T, "the report in the aggregates", |s| {
            // Rates need two periods: the first one that sees a stream has no previous count.
            stream(s, "cam")["latency_ms"]["reporting"] == 1
                && s["totals"]["viewers"] == 5
                && stream(s, "cam")["fps_in"].as_f64() > Some(0.0)
        })
        .await;
    let cam = stream(&snap, "cam");
    assert_eq!(cam["latency_ms"]["min"], 240.0, "{cam}");
    assert_eq!(cam["latency_ms"]["max"], 240.0, "{cam}");
    assert_eq!(cam["viewers"], 5);
    assert_eq!(cam["live"], true);
    assert_eq!(cam["video"]["width"], 640);
    let fps = cam["fps_in"].as_f64().expect("fps_in");
    assert!((25.0..=35.0).contains(&fps), "fps in {fps}");
    assert!(cam["bitrate_in_kbps"].as_f64() > Some(0.0), "{cam}");
    assert!(snap["totals"]["bitrate_out_kbps"].as_f64() > Some(0.0));
    // The page: 3 of 5 rows, in id order, the reporter's with its report.
    let page = &snap["viewers"];
    assert_eq!(
        (page["total"].as_u64(), page["limit"].as_u64()),
        (Some(5), Some(3))
    );
    let rows = page["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], reporter_id);
    assert_eq!(rows[0]["report"]["latency_ms"], 240);
    assert_eq!(rows[0]["report"]["state"], "playing");
    assert!(rows[0]["bytes_sent"].as_u64() > Some(0));
    assert_eq!(rows[1]["report"], Value::Null, "no report from the others");

    // The stream's detail lists its viewers, paged like the feed.
    let detail = server.api("/api/streams/cam").await;
    assert_eq!(detail["viewers"]["total"], 5, "{detail}");
    let listed: Vec<u64> = detail["viewers"]["rows"]
        .as_array()
        .expect("viewers")
        .iter()
        .filter_map(|v| v["id"].as_u64())
        .collect();
    assert_eq!(listed.len(), 5, "{detail}");
    assert!(listed.contains(&reporter_id));
    assert_eq!(detail["stats"]["latency_ms"]["avg"], 240.0);
    // The source, described from its init, with every viewer on it; beside it at most the
    // default ladder of a 360p source (one 240p rung), once its ffmpeg has started.
    let renditions = detail["renditions"].as_array().expect("renditions");
    assert!(
        renditions[1..]
            .iter()
            .all(|r| r["name"] == "240p" && r["nominal_kbps"] == 300 && r["viewers"] == 0),
        "{detail}"
    );
    assert!(renditions.len() <= 2, "{detail}");
    let source = &renditions[0];
    assert_eq!(source["name"], "source", "{source}");
    assert_eq!(
        (source["width"].as_u64(), source["height"].as_u64()),
        (Some(640), Some(360))
    );
    assert!(
        source["codec"]
            .as_str()
            .is_some_and(|c| c.starts_with("avc1.")),
        "{source}"
    );
    assert_eq!(source["viewers"], 5, "{source}");
    assert!(source["bitrate_kbps"].as_f64() > Some(0.0), "{source}");
    assert_eq!(rows[0]["rendition"], 0);
    assert_eq!(rows[0]["switches"], 0);
    let text = metrics(&server).await;
    assert!(
        metric(&text, "onair_viewer_reports_total") >= Some(1.0),
        "{text}"
    );
    assert!(metric(&text, "onair_viewer_latency_seconds_count") >= Some(1.0));
    assert!(metric(&text, "onair_viewer_latency_seconds_bucket{le=\"0.25\"}") >= Some(1.0));
    assert!(metric(&text, "onair_viewer_bytes_sent_total") > Some(0.0));

    // Removing a viewer takes the token; the viewer is closed with 4001 and does not count.
    let path = format!("/api/viewers/{reporter_id}");
    let (status, _) = http_request(&server.http, "DELETE", &path, &[])
        .await
        .expect("request");
    assert_eq!(status, 401);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (status, body) = http_request(&server.http, "DELETE", &path, &auth)
        .await
        .expect("request");
    assert_eq!(status, 204, "{body}");
    let close = reporter.wait_close(T).await;
    assert_eq!(
        close,
        Some((4001, "removed by the server's operator".to_string()))
    );
    feed.snapshot_where(T, "4 viewers left", |s| s["totals"]["viewers"] == 4)
        .await;
    assert_eq!(server.api("/api/streams").await[0]["viewers"], 4);
    let text = metrics(&server).await;
    assert_eq!(metric(&text, "onair_viewers"), Some(4.0));
    assert_eq!(
        metric(
            &text,
            "onair_viewer_disconnects_total{reason=\"removed_by_operator\"}"
        ),
        Some(1.0)
    );
    let (status, _) = http_request(&server.http, "DELETE", &path, &auth)
        .await
        .expect("request");
    assert_eq!(status, 404, "already gone");
    let (status, _) = http_request(&server.http, "DELETE", "/api/viewers/abc", &auth)
        .await
        .expect("request");
    assert_eq!(status, 400);
    for t in others {
        t.abort();
    }
}

#[tokio::test]
async fn malformed_viewer_messages_close_with_a_reason_and_spare_everyone_else() {
    let server = Server::start(&[]).await;
    let _publisher = Publisher::start(&server.rtmp_url("cam"), Profile::default());
    let (mut good, good_id) = viewer(&server, "cam").await;
    send_report(&mut good, report(300)).await;

    let media = MediaHeader {
        track: 0,
        keyframe: true,
        dts: 0,
        cts: 0,
        ingest_us: 0,
    };
    let encode = |m: Message<'_>| m.to_vec().expect("encode");
    let cases: Vec<(&str, Vec<Vec<u8>>, u16, &str)> = vec![
        (
            "truncated stats",
            vec![vec![0x30, 0, 0]],
            1002,
            "bad message",
        ),
        ("unknown kind", vec![vec![0x7f]], 1002, "bad message"),
        (
            "unknown player state",
            vec![encode(Message::ViewerStats(ViewerStats {
                state: 9,
                ..report(250)
            }))],
            1008,
            "unknown player state",
        ),
        (
            "absurd latency",
            vec![encode(Message::ViewerStats(report(u32::MAX)))],
            1008,
            "out of range",
        ),
        (
            "media from a viewer",
            vec![encode(Message::Media {
                header: media,
                payload: b"x",
            })],
            1002,
            "may not send media",
        ),
        (
            "a server's control op from a viewer",
            vec![encode(Message::Control(Control::Receipts {
                every_ms: 250,
            }))],
            1002,
            "may not send control op 3",
        ),
        (
            "a rendition that does not exist",
            vec![encode(Message::Control(Control::SwitchRendition(3)))],
            1008,
            "no rendition 3",
        ),
        (
            "a flood",
            (0..200)
                .map(|t0| encode(Message::TimeSyncRequest(TimeSyncRequest { t0 })))
                .collect(),
            1008,
            "too many messages",
        ),
    ];
    let protocol_errors = cases.iter().filter(|c| c.2 == 1002).count();
    let refused = cases.iter().filter(|c| c.2 == 1008).count();
    assert_eq!((protocol_errors, refused), (4, 4));
    for (what, messages, code, reason) in cases {
        let (mut bad, _) = viewer(&server, "cam").await;
        for m in messages {
            // The flood is refused part-way: the server has decided, and closed.
            if bad.try_send_bytes(m).await.is_err() {
                break;
            }
        }
        let close = bad.wait_close(T).await;
        let (got_code, got_reason) = close.unwrap_or_else(|| panic!("{what}: no close frame"));
        assert_eq!(got_code, code, "{what}: {got_reason}");
        assert!(got_reason.contains(reason), "{what}: {got_reason:?}");
    }

    // The good viewer still plays, never skipped, and its report alone makes the aggregates.
    good.recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    let answer = send_report(&mut good, report(300)).await;
    assert_eq!(answer.keyframe_skips, 0);
    let mut feed = Feed::open(&server.http, "").await;
    let snap = feed
        .snapshot_where(T, "only the good viewer left", |s| {
            s["totals"]["viewers"] == 1
        })
        .await;
    let cam = stream(&snap, "cam");
    assert_eq!(cam["latency_ms"]["reporting"], 1, "{cam}");
    assert_eq!(cam["latency_ms"]["max"], 300.0, "{cam}");
    assert_eq!(snap["viewers"]["rows"][0]["id"], good_id);
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            "onair_viewer_disconnects_total{reason=\"protocol_error\"}"
        ),
        Some(protocol_errors as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "onair_viewer_disconnects_total{reason=\"refused\"}"),
        Some(refused as f64),
        "{text}"
    );
    // Only the good viewer's two reports were ever recorded: the refused ones never were.
    assert_eq!(
        metric(&text, "onair_viewer_reports_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "onair_viewer_latency_seconds_count"),
        Some(2.0)
    );
}
