//! Publish, play and read credentials on every way in and out (the security issue's R5): with
//! none, a wrong, an expired or another stream's credential, every way is refused with a reason;
//! with the right one, it works. Real ffmpeg publishes over RTMP and reads HLS.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use onair_protocol::wire::Message;
use onair_tests::{Profile, Publisher, Server, Viewer, http_fetch, metric};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "jwt-secret-for-the-auth-test";
const KEY: &str = "cam-publish-key";
const READ: &str = "read-token-for-the-auth-test";
const ADMIN: &str = "admin-token-for-the-auth-test";

fn token(sub: &str, act: &str, exp_from_now: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let claims = serde_json::json!({ "sub": sub, "act": act, "exp": now + exp_from_now });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
    )
    .expect("sign")
}

fn config(tcp_port: u16) -> String {
    let dir = onair_tests::browser::artifacts_dir().join(format!("auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let path = dir.join("auth.toml");
    let toml = format!(
        "jwt_secret = \"{SECRET}\"\nread_token = \"{READ}\"\nadmin_token = \"{ADMIN}\"\n\
         [streams.cam]\npublish_key = \"{KEY}\"\nplay = \"token\"\nladder = []\n\
         [streams.\"*\"]\nladder = []\n\
         [[listen]]\nname = \"tcpcam\"\naddr = \"127.0.0.1:{tcp_port}\"\nallow = [\"10.0.0.0/8\", \"127.0.0.2\"]\n"
    );
    std::fs::write(&path, toml).expect("write config");
    path.to_string_lossy().to_string()
}

/// A WebSocket handshake's answer: the status of a refusal and its body, or 101.
async fn ws_status(url: &str, origin: Option<&str>) -> (u16, String) {
    let mut req = url.into_client_request().expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", o.parse().expect("origin header"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, String::new()),
        Err(tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
        ),
        Err(e) => panic!("{url}: {e}"),
    }
}

async fn get(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let r = http_fetch(&server.http, "GET", path, headers)
        .await
        .expect("GET");
    (r.status, r.text())
}

/// Publishes to `key` with ffmpeg; returns the server log line of its refusal.
async fn refused_publish(server: &Server, key: &str, reason: &str) {
    let from = server.log_lines();
    let publisher = Publisher::start(&server.rtmp_url(key), Profile::default());
    let (status, _) = publisher.wait_exit(T).await;
    assert!(!status.success(), "{key}: ffmpeg should fail");
    let line = server
        .wait_log_since(from, &format!("unauthorized: {reason}"), T)
        .await;
    assert!(
        line.contains("peer=127.0.0.1"),
        "logged with the address: {line}"
    );
}

#[tokio::test]
async fn every_way_in_and_out_needs_its_credential() {
    let tcp_port = onair_tests::free_port().expect("port");
    let server = Server::start(&["--config", &config(tcp_port)]).await;

    // RTMP publish, with ffmpeg: the key in the stream key, as OBS's Stream Key field takes it.
    refused_publish(&server, "cam", "credentials required").await;
    refused_publish(&server, "cam?token=not-the-key", "wrong key or token").await;
    let expired = token("cam", "publish", -60);
    refused_publish(&server, &format!("cam?token={expired}"), "token expired").await;
    let other = token("dog", "publish", 60);
    refused_publish(
        &server,
        &format!("cam?token={other}"),
        "token is for another stream",
    )
    .await;
    let play = token("cam", "play", 60);
    refused_publish(
        &server,
        &format!("cam?token={play}"),
        "token does not grant publish",
    )
    .await;
    let publisher = Publisher::start(
        &server.rtmp_url(&format!("cam?token={KEY}")),
        Profile::default(),
    );
    server.wait_log("publishing", T).await;

    // The WebSocket ingest: the same rules before the upgrade, and a page elsewhere may not
    // publish from its visitors' browsers.
    let ingest = |q: &str| format!("ws://{}/ingest/dog{q}", server.http);
    let (status, body) = ws_status(&ingest(""), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("credentials required"), "{body}");
    assert_eq!(ws_status(&ingest("?token=nope"), None).await.0, 403);
    let cam_token = token("cam", "publish", 60);
    let (status, body) = ws_status(&ingest(&format!("?token={cam_token}")), None).await;
    assert_eq!(status, 403, "another stream's token: {body}");
    let dog_expired = token("dog", "publish", -60);
    let (status, body) = ws_status(&ingest(&format!("?token={dog_expired}")), None).await;
    assert_eq!(status, 403, "an expired token: {body}");
    assert!(body.contains("token expired"), "{body}");
    let any = token("*", "publish", 60);
    let (status, body) = ws_status(
        &ingest(&format!("?token={any}")),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(status, 403, "a foreign page: {body}");
    assert_eq!(
        ws_status(&ingest(&format!("?token={any}")), None).await.0,
        101
    );

    // A TCP listener with an allow list closes other addresses at once.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port))
        .await
        .expect("connect");
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut tcp, &mut byte))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    // An address on the list publishes.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0)))
        .expect("bind 127.0.0.2");
    let mut allowed = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], tcp_port)))
        .await
        .expect("connect from an allowed address");
    let from = server.log_lines();
    // An access unit delimiter: raw H.264 begins.
    tokio::io::AsyncWriteExt::write_all(&mut allowed, &[0, 0, 0, 1, 0x09, 0xf0])
        .await
        .expect("write");
    let line = server
        .wait_log_since(from, "publishing (raw H.264)", T)
        .await;
    assert!(line.contains("127.0.0.2"), "{line}");
    drop(allowed);

    // WebSocket play needs a play token for this stream.
    let play_url = |q: &str| format!("{}{q}", server.ws_url("cam"));
    assert_eq!(ws_status(&play_url(""), None).await.0, 401);
    for (what, t) in [
        ("expired", token("cam", "play", -60)),
        ("another stream's", token("dog", "play", 60)),
        ("a publish token", token("cam", "publish", 60)),
        ("the publish key", KEY.to_string()),
    ] {
        let (status, body) = ws_status(&play_url(&format!("?token={t}")), None).await;
        assert_eq!(status, 403, "{what}: {body}");
    }
    let play = token("cam", "play", 60);
    let mut viewer = Viewer::connect(&play_url(&format!("?token={play}"))).await;
    let got = viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    assert!(!got.is_empty());

    // HLS: every URL needs the token, and the playlist carries it on to every URI it lists,
    // so ffprobe, given the playlist's URL with the token, reads the stream.
    assert_eq!(get(&server, "/hls/cam/index.m3u8", &[]).await.0, 401);
    for (what, t) in [
        ("wrong", "nope".to_string()),
        ("expired", token("cam", "play", -60)),
        ("another stream's", token("dog", "play", 60)),
        ("a publish token", token("cam", "publish", 60)),
    ] {
        let (status, body) = get(&server, &format!("/hls/cam/index.m3u8?token={t}"), &[]).await;
        assert_eq!(status, 403, "HLS, {what}: {body}");
    }
    let (status, playlist) = get(&server, &format!("/hls/cam/index.m3u8?token={play}"), &[]).await;
    assert_eq!(status, 200, "{playlist}");
    let uris: Vec<&str> = playlist
        .lines()
        .filter_map(|l| {
            l.split("URI=\"")
                .nth(1)
                .and_then(|u| u.split('"').next())
                .or((!l.starts_with('#') && !l.is_empty()).then_some(l))
        })
        .collect();
    assert!(!uris.is_empty(), "{playlist}");
    for uri in &uris {
        assert!(uri.ends_with(&format!("?token={play}")), "{uri}");
    }
    let bare = uris[0].split('?').next().unwrap_or_default();
    assert_eq!(get(&server, &format!("/hls/cam/{bare}"), &[]).await.0, 401);
    let dog_play = token("dog", "play", 60);
    let (status, _) = get(&server, &format!("/hls/cam/{bare}?token={dog_play}"), &[]).await;
    assert_eq!(status, 403, "a part with another stream's token");
    // ffprobe reads whole segments: wait (a blocking reload) until two are complete.
    for msn in 1..=2 {
        let held = format!("/hls/cam/index.m3u8?token={play}&_HLS_msn={msn}&_HLS_part=0");
        let (status, body) = get(&server, &held, &[]).await;
        assert_eq!(status, 200, "segment {msn}: {body}");
    }
    let url = format!("http://{}/hls/cam/index.m3u8?token={play}", server.http);
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name,height"])
        .args(["-of", "csv=p=0"])
        .arg(&url)
        .output()
        .await
        .expect("run ffprobe");
    let out = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success() && out.contains("h264,360"),
        "ffprobe: {out} {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    // Reading: the API, its feed, the dashboard and the metrics need the read token (Bearer,
    // in any case, or ?token=).
    for path in [
        "/api/streams",
        "/api/streams/cam",
        "/api/events",
        "/metrics",
        "/dashboard",
    ] {
        assert_eq!(get(&server, path, &[]).await.0, 401, "{path}");
        let wrong = get(&server, path, &[("Authorization", "Bearer nope")])
            .await
            .0;
        assert_eq!(wrong, 403, "{path}");
    }
    let bearer = format!("bearer {READ}");
    let (status, list) = get(&server, "/api/streams", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 200, "{list}");
    assert!(list.contains("\"cam\""), "{list}");
    let (status, page) = get(&server, &format!("/dashboard?token={READ}"), &[]).await;
    assert_eq!(status, 200);
    assert!(page.contains("EventSource"), "the dashboard page");
    // Changing: the admin token, and only it.
    let delete = |token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let http = server.http.clone();
        async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("Authorization", a)])
                .unwrap_or_default();
            http_fetch(&http, "DELETE", "/api/viewers/987654321", &headers)
                .await
                .expect("DELETE")
                .status
        }
    };
    assert_eq!(delete(None).await, 401, "no token");
    assert_eq!(delete(Some("nope")).await, 403, "a wrong token");
    assert_eq!(delete(Some(READ)).await, 403, "the read token");
    assert_eq!(
        delete(Some(ADMIN)).await,
        404,
        "the admin token: no such viewer"
    );
    let auth = format!("Bearer {READ}");
    let (_, metrics) = get(&server, "/metrics", &[("Authorization", &auth)]).await;
    for (labels, at_least) in [
        (
            "action=\"publish\",protocol=\"rtmp\",reason=\"missing\"",
            1.0,
        ),
        ("action=\"publish\",protocol=\"rtmp\",reason=\"wrong\"", 1.0),
        (
            "action=\"publish\",protocol=\"rtmp\",reason=\"expired\"",
            1.0,
        ),
        (
            "action=\"publish\",protocol=\"tcp\",reason=\"address\"",
            1.0,
        ),
        (
            "action=\"play\",protocol=\"ws\",reason=\"other_action\"",
            1.0,
        ),
        ("action=\"play\",protocol=\"hls\",reason=\"missing\"", 2.0),
        ("action=\"read\",protocol=\"http\",reason=\"wrong\"", 5.0),
    ] {
        let sample = format!("onair_auth_refusals_total{{{labels}}}");
        let got = metric(&metrics, &sample).unwrap_or(0.0);
        assert!(got >= at_least, "{sample} = {got}:\n{metrics}");
    }

    // No secret or token ever reaches the log.
    for secret in [
        SECRET,
        KEY,
        READ,
        ADMIN,
        "not-the-key",
        play.as_str(),
        expired.as_str(),
    ] {
        assert!(
            server.log_matching(secret).is_empty(),
            "the log shows a credential: {:?}",
            server.log_matching(secret)
        );
    }
    publisher.kill().await;
}

#[tokio::test]
async fn an_open_server_says_so_and_secrets_on_the_command_line_are_flagged() {
    // Reachable beyond loopback with no publish credential configured: one warning at start.
    let server = Server::start(&["--rtmp", "0.0.0.0:0", "--read-token", READ]).await;
    let open = server.log_matching("anyone who can reach this server can publish");
    assert_eq!(open.len(), 1, "{open:?}");
    let flagged = server.log_matching("read_token was given on the command line");
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert!(
        server.log_matching(READ).is_empty(),
        "the token itself is not logged"
    );
    // Loopback only, the token from the environment: neither warning.
    let quiet = Server::start_with_env(&[], &[("ONAIR_READ_TOKEN", READ)]).await;
    assert!(quiet.log_matching("anyone who can reach").is_empty());
    assert!(quiet.log_matching("given on the command line").is_empty());
}

/// An operator's auth service: admits the token `hook-ok` (204), refuses the rest (403), and
/// keeps every request body it was sent.
async fn hook_service() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then a Content-Length body.
                let body = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break buf[end + 4..end + 4 + len].to_vec();
                    }
                };
                let json: serde_json::Value = serde_json::from_slice(&body).expect("hook json");
                let ok = json["token"] == "hook-ok";
                log.lock().expect("lock").push(json);
                let answer: &[u8] = if ok {
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn an_auth_hook_decides_what_keys_and_tokens_do_not() {
    let (port, seen) = hook_service().await;
    let hook = format!("http://127.0.0.1:{port}/auth");
    let server = Server::start(&["--auth-hook-url", &hook]).await;

    // RTMP, with ffmpeg: the hook is told who asks for what, and its 403 is the refusal.
    refused_publish(
        &server,
        "cam?token=nope",
        "refused by the auth hook (HTTP 403)",
    )
    .await;
    let publisher = Publisher::start(&server.rtmp_url("cam?token=hook-ok"), Profile::default());
    server.wait_log("publishing", T).await;
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            seen[1],
            serde_json::json!({
                "action": "publish", "stream": "cam", "protocol": "rtmp",
                "addr": "127.0.0.1", "token": "hook-ok"
            })
        );
    }

    // The WebSocket ingest asks it too; an answer is kept for a few seconds, so the same
    // request again does not ask twice.
    let ingest = format!("ws://{}/ingest/dog?token=nope", server.http);
    assert_eq!(ws_status(&ingest, None).await.0, 403);
    assert_eq!(ws_status(&ingest, None).await.0, 403);
    let asked = seen.lock().expect("lock").len();
    assert_eq!(asked, 3, "the second answer came from the cache");
    // Play is open here (no stream asks for play tokens): the hook is not asked.
    let mut viewer = Viewer::connect(&server.ws_url("cam")).await;
    viewer
        .recv_until(T, |m| matches!(m, Message::Media { .. }))
        .await;
    assert_eq!(seen.lock().expect("lock").len(), 3);
    publisher.kill().await;
}

#[tokio::test]
async fn an_auth_hook_that_does_not_answer_refuses() {
    // A port with nobody listening.
    let port = onair_tests::free_port().expect("port");
    let hook = format!("http://127.0.0.1:{port}/auth");
    let server = Server::start(&["--auth-hook-url", &hook]).await;
    let ingest = format!("ws://{}/ingest/dog?token=x", server.http);
    let (status, body) = ws_status(&ingest, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("did not answer"), "{body}");
    server.wait_log("auth hook unreachable: refused", T).await;
}
