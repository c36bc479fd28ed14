//! The REST API's mutating calls: refused without the admin token, and `DELETE
//! /api/streams/NAME` disconnecting a real ffmpeg publisher while its viewers stay, waiting.

use std::time::Duration;

use onair_protocol::wire::{Message, StatusCode};
use onair_tests::{Profile, Publisher, Server, Viewer, http_request};

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

    for auth in [None, Some("Bearer wrong-token-0123456789ab"), Some(TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, body) = http_request(&server.http, "DELETE", "/api/streams/ops", &headers)
            .await
            .expect("request");
        assert_eq!(status, 401, "{auth:?}: {body}");
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
