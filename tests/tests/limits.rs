//! Limits on what clients can take from the server.

use std::time::Duration;

use onair_tests::{Server, metric, onair_bin};

const T: Duration = Duration::from_secs(10);

/// (soft, hard) "Max open files" of a process, from /proc.
fn open_files(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut n = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (n.next().expect("soft"), n.next().expect("hard"))
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    // Started as a stock Debian login starts it: a soft limit of 1024.
    let dir = onair_tests::browser::artifacts_dir().join(format!("limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let wrapper = dir.join("onair-1024");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -S -n 1024\nexec {} \"$@\"\n",
            onair_bin().display()
        ),
    )
    .expect("write wrapper");
    let chmod = std::process::Command::new("chmod")
        .args(["+x", &wrapper.to_string_lossy()])
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let server = Server::start_bin(&wrapper, &[], &[]).await;
    let (soft, hard) = open_files(server.pid());
    assert!(
        hard > 1024,
        "this machine's hard limit is {hard}: nothing to raise"
    );
    assert_eq!(soft, hard, "raised from 1024 to the hard limit");
    let (_, metrics) = onair_tests::http_get(&server.http, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(
        metric(&metrics, "onair_open_files_limit"),
        Some(hard as f64),
        "{metrics}"
    );
    server.wait_log(&format!("limit={hard}"), T).await;
}

/// Waits until the server counts no connection in its handshake (asked from 127.0.0.2,
/// whose own request is past its handshake when the metrics are written).
async fn no_handshakes_left(server: &Server) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let metrics = get_from([127, 0, 0, 2], &server.http, "/metrics").await;
        if metric(&metrics, "onair_connections_in_handshake") == Some(0.0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections still in their handshake: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection from `ip` to `addr` that sends nothing.
async fn idle(ip: [u8; 4], addr: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((ip, 0)))
        .expect("bind a loopback address");
    socket
        .connect(addr.parse().expect("addr"))
        .await
        .expect("connect")
}

/// How many of them the server closed at once, all watched together (a held one is closed
/// too once its handshake times out, after 10 s).
async fn count_closed(sockets: &mut [tokio::net::TcpStream]) -> usize {
    futures_util::future::join_all(sockets.iter_mut().map(closed_at_once))
        .await
        .into_iter()
        .filter(|c| *c)
        .count()
}

/// A GET from `ip`; the body.
async fn get_from(ip: [u8; 4], addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = idle(ip, addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).to_string()
}

/// Whether the server closed it at once (EOF within a second) rather than holding it.
async fn closed_at_once(s: &mut tokio::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::io::AsyncReadExt::read(s, &mut b)
        )
        .await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn idle_sockets_from_one_address_are_capped_and_others_are_still_served() {
    let server = Server::start(&["--max-handshakes-per-address", "50"]).await;
    for (listener, addr) in [("http", server.http.clone()), ("rtmp", server.rtmp.clone())] {
        let mut held = Vec::new();
        for _ in 0..200 {
            held.push(idle([127, 0, 0, 1], &addr).await);
        }
        let closed = count_closed(&mut held).await;
        assert_eq!(
            closed, 150,
            "{listener}: 50 held in their handshake, the rest closed"
        );
        // Another address is served meanwhile.
        let mut other = idle([127, 0, 0, 2], &addr).await;
        assert!(
            !closed_at_once(&mut other).await,
            "{listener}: 127.0.0.2 is held too"
        );
        drop(other);
        // A viewer's log line after the refusals (from another address): once it is read,
        // so are they.
        let mark = server.log_lines();
        let url = server.ws_url(&format!("mark-{listener}"));
        let tcp = idle([127, 0, 0, 2], &server.http).await;
        let viewer = tokio_tungstenite::client_async(url, tcp)
            .await
            .expect("viewer");
        server.wait_log_since(mark, "viewer connected", T).await;
        drop(viewer);
        // Once per address and reason, whatever the listener.
        let refusals = server
            .log_matching("ip=127.0.0.1 listener=\"http\" reason=\"max_handshakes_per_address\"");
        assert_eq!(refusals.len(), 1, "logged once: {refusals:?}");
        assert!(server.log_matching("listener=\"rtmp\" reason").is_empty());
        drop(held);
        // The count is per address over every listener, and the server lets go of the dropped
        // sockets' places as it reads their ends: wait for that, or the next listener's first
        // connections find this address still full.
        no_handshakes_left(&server).await;
    }
    // The refusals were counted (asked from another address).
    let metrics = get_from([127, 0, 0, 2], &server.http, "/metrics").await;
    for listener in ["http", "rtmp"] {
        let sample = format!(
            "onair_connections_refused_total{{listener=\"{listener}\",reason=\"max_handshakes_per_address\"}}"
        );
        assert_eq!(metric(&metrics, &sample), Some(150.0), "{metrics}");
    }
}

#[tokio::test]
async fn connections_beyond_the_total_are_closed_at_accept() {
    let server = Server::start(&["--max-connections", "20"]).await;
    let mut held = Vec::new();
    for i in 0..30u8 {
        held.push(idle([127, 0, 1, i + 1], &server.http).await);
    }
    assert_eq!(count_closed(&mut held).await, 10);
    server.wait_log("reason=\"max_connections\"", T).await;
}
