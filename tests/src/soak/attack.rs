//! R4: what a hostile client can throw at every port while a stream plays: garbage, oversize
//! headers, slowloris, idle sockets from one address, and a flood of held LL-HLS requests.
//! The viewers must lose no frame, the server must stay up with its RSS bounded, and other
//! addresses must still be served. `make soak` runs it at full size, `make test` small
//! (`tests/tests/faults.rs`).
//!
//! Each attack comes from its own loopback address (127.0.0.0/8 is all loopback), so that the
//! per-address rules meet it; the viewers connect from 127.0.0.1 and the checks of "other
//! addresses" from 127.0.0.2.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Group, Live, Seen, sample_rss};
use crate::BoxError;
use crate::load::{STREAM, rss_bytes, viewers};

/// How hard R4 pushes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub viewers: usize,
    /// Idle sockets from one address to the HTTP port.
    pub idle_sockets: usize,
    /// Blocking LL-HLS playlist requests kept open at once.
    pub held_hls: usize,
    /// Connections at a time per port for each of garbage, oversize headers and slowloris.
    pub per_port: usize,
    pub window: Duration,
}

/// What one attack did and what became of its connections.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Attack {
    pub name: String,
    /// Connections made; how many the server ended (closed, reset, or answered with an error
    /// status), and how many it still held after 20 s (any of its timeouts is shorter). The
    /// rest were in flight when the run ended.
    pub connections: u64,
    pub ended_by_server: u64,
    pub outlasted: u64,
    /// The longest the server took to end one, in seconds.
    pub longest_s: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct R4 {
    pub viewers: usize,
    pub window_s: f64,
    pub seen: Seen,
    pub attacks: Vec<Attack>,
    /// Idle sockets: opened, and closed by the server at once (over the per-address cap).
    pub idle_opened: usize,
    pub idle_closed_at_once: usize,
    /// Held LL-HLS requests: answers by status (200 when the part came, 503 over the cap),
    /// connections closed without an answer (refused at accept), anything else.
    pub hls_200: u64,
    pub hls_503: u64,
    pub hls_refused: u64,
    pub hls_other: u64,
    /// From another address during the attacks: a new viewer's first frame, `GET
    /// /api/streams`, an LL-HLS playlist and an RTMP handshake (ms each).
    pub other_viewer_ms: f64,
    pub other_api_ms: f64,
    pub other_hls_ms: f64,
    pub other_rtmp_ms: f64,
    pub rss_before: u64,
    /// The most in the first half of the attacks, and in all of them: bounded is the second
    /// no higher than the first.
    pub rss_max_first_half: u64,
    pub rss_max: u64,
    pub rss_after: u64,
    pub server_up: bool,
    /// The server's refusal counters afterwards, as `/metrics` has them.
    pub refusals: Vec<String>,
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn connect_from(ip: IpAddr, addr: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let socket = TcpSocket::new_v4()?;
    socket.bind((ip, 0).into())?;
    socket.connect(to).await
}

/// Reads until the server ends the connection (end of stream, reset, or an HTTP status line
/// of an error) or `timeout`; whether it ended it.
async fn ended_by_server(s: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n))
                if buf[..n].starts_with(b"HTTP/1.1 4") || buf[..n].starts_with(b"HTTP/1.1 5") =>
            {
                return true;
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Random-looking bytes (xorshift): no RNG crate needed, and no two runs need to agree.
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The simple RTMP handshake (C0, C1; S0, S1, S2; C2) as a client.
async fn rtmp_handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut c01 = vec![3u8];
    c01.extend_from_slice(&[0u8; 8]);
    c01.extend_from_slice(&garbage(1528, 7));
    s.write_all(&c01).await?;
    let mut s012 = vec![0u8; 1 + 1536 * 2];
    s.read_exact(&mut s012).await?;
    s.write_all(&s012[1..1537]).await
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Garbage,
    Oversize,
    Slowloris,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Port {
    Rtmp,
    Http,
    Tcp,
}

/// One attacker: connects from `ip`, does `kind` to `port`, waits for the server to end the
/// connection, and starts over until `stop`.
async fn attacker(
    kind: Kind,
    port: Port,
    addr: String,
    ip: IpAddr,
    stop: CancellationToken,
    tally: Arc<Tally>,
) {
    let mut seed = 1u64;
    while !stop.is_cancelled() {
        seed += 1;
        let Ok(mut s) = connect_from(ip, &addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tally.connections.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::select! {
            ended = attack_one(kind, port, &mut s, seed) => if ended {
                tally.ended(t0.elapsed());
            } else {
                tally.outlasted.fetch_add(1, Ordering::Relaxed);
            },
            _ = stop.cancelled() => {}
        }
    }
}

async fn attack_one(kind: Kind, port: Port, s: &mut TcpStream, seed: u64) -> bool {
    // Long enough for any handshake or header timeout (10 s by default) to strike.
    let patience = Duration::from_secs(20);
    let sent = match (kind, port) {
        (Kind::Garbage, _) => s.write_all(&garbage(64 << 10, seed)).await,
        (Kind::Oversize, Port::Http) => {
            // A WebSocket upgrade whose head never ends: 1 MiB of one header.
            let mut req = format!(
                "GET /ws/{STREAM} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nX-Big: "
            )
            .into_bytes();
            req.extend(std::iter::repeat_n(b'a', 1 << 20));
            s.write_all(&req).await
        }
        (Kind::Oversize, Port::Rtmp) => {
            // After the handshake, an AMF command message that says it is 16 MiB long.
            if rtmp_handshake(s).await.is_err() {
                return true;
            }
            let mut m = vec![0x03, 0, 0, 0, 0xff, 0xff, 0xff, 20, 0, 0, 0, 0];
            m.extend_from_slice(&garbage(128, seed));
            let r = s.write_all(&m).await;
            // Then more of it, in 128-byte chunks (type 3 headers), for as long as it is taken.
            for _ in 0..1024 {
                if r.is_err() {
                    break;
                }
                let mut c = vec![0xc3];
                c.extend_from_slice(&garbage(128, seed + 1));
                if s.write_all(&c).await.is_err() {
                    return true;
                }
            }
            r
        }
        (Kind::Oversize, Port::Tcp) => {
            // Raw H.264: a start code, then one NAL unit that never ends (32 MiB).
            let mut r = s.write_all(&[0, 0, 0, 1, 0x65]).await;
            for _ in 0..512 {
                if r.is_err() {
                    break;
                }
                r = s.write_all(&[0x55u8; 64 << 10]).await;
            }
            r
        }
        (Kind::Slowloris, _) => {
            let opening: &[u8] = match port {
                Port::Http => b"GET / HTTP/1.1\r\nHost: x\r\n",
                Port::Rtmp => &[3],
                Port::Tcp => &[0, 0, 0],
            };
            if s.write_all(opening).await.is_err() {
                return true;
            }
            // A byte every second, never finishing the head or handshake.
            let deadline = Instant::now() + patience;
            while Instant::now() < deadline {
                if s.write_all(b"a").await.is_err() {
                    return true;
                }
                let mut b = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(n)) if b[..n].starts_with(b"HTTP/1.1 4") => return true,
                    _ => {}
                }
            }
            return false;
        }
    };
    if sent.is_err() {
        return true;
    }
    ended_by_server(s, patience).await
}

#[derive(Default)]
struct Tally {
    connections: AtomicU64,
    ended: AtomicU64,
    outlasted: AtomicU64,
    longest_ms: AtomicU64,
}

impl Tally {
    fn ended(&self, took: Duration) {
        self.ended.fetch_add(1, Ordering::Relaxed);
        self.longest_ms
            .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
    }
}

/// Blocking playlist requests from `ip`, `n` at a time, each for the first part of the
/// segment after the one being written (held until it starts), until `stop`; counts the
/// answers.
async fn hls_flood(
    http: String,
    ip: IpAddr,
    n: usize,
    stop: CancellationToken,
    counts: Arc<[AtomicU64; 4]>,
) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (http, stop, counts) = (http.clone(), stop.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let next = next_msn(&http).await.unwrap_or(0) + 1;
                let Ok(mut s) = connect_from(ip, &http).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let req = format!(
                    "GET /hls/{STREAM}/source/index.m3u8?_HLS_msn={next}&_HLS_part=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(req.as_bytes()).await.is_err() {
                    continue;
                }
                let mut head = [0u8; 12];
                let got = tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut head)) => r,
                    _ = stop.cancelled() => return,
                };
                let i = match got {
                    Ok(Ok(_)) if &head[9..12] == b"200" => 0,
                    Ok(Ok(_)) if &head[9..12] == b"503" => 1,
                    // Closed without an answer: refused at accept (too many connections of
                    // this address in their handshake).
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => 2,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => 2,
                    _ => 3,
                };
                counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The segment the source's packager is writing: one past the last complete one its media
/// playlist lists.
async fn next_msn(http: &str) -> Option<u64> {
    let (_, body) = crate::http_get(http, &format!("/hls/{STREAM}/source/index.m3u8"))
        .await
        .ok()?;
    let media_sequence: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))?
        .trim()
        .parse()
        .ok()?;
    let segments = body.lines().filter(|l| l.starts_with("#EXTINF")).count() as u64;
    Some(media_sequence + segments)
}

/// What another address gets meanwhile: (viewer's first frame, API, HLS playlist, RTMP
/// handshake), in ms.
async fn other_address(live: &Live) -> Result<(f64, f64, f64, f64), BoxError> {
    let ip = loopback(2);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    let mut ws = viewers::connect(&live.server.http, &format!("/ws/{STREAM}"), Some(ip)).await?;
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
            .await
            .map_err(|_| "no frame for a viewer from another address within 10 s")??;
        if let Ok(onair_protocol::wire::Message::Media { header, .. }) =
            onair_protocol::wire::Message::decode(&f.payload)
            && header.track == 0
        {
            break;
        }
    }
    let viewer = ms(t);
    let get = |path: String| async move {
        let t = Instant::now();
        let mut s = connect_from(ip, &live.server.http).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await??;
        if &head[9..12] != b"200" {
            return Err::<f64, BoxError>(
                format!(
                    "GET {path} from another address: {}",
                    String::from_utf8_lossy(&head)
                )
                .into(),
            );
        }
        Ok(ms(t))
    };
    let api = get("/api/streams".into()).await?;
    let hls = get(format!("/hls/{STREAM}/source/index.m3u8")).await?;
    let t = Instant::now();
    let mut s = connect_from(ip, &live.server.rtmp).await?;
    tokio::time::timeout(Duration::from_secs(10), rtmp_handshake(&mut s)).await??;
    let rtmp = ms(t);
    Ok((viewer, api, hls, rtmp))
}

/// TCP listeners take one source each (a second connection finds its stream busy), so every
/// kind of attack gets its own.
pub const TCP_LISTENERS: usize = 3;

/// The TOML that R4's server needs: the TCP listeners to attack, on `ports`.
pub fn config(ports: [u16; TCP_LISTENERS]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[listen]]\nname = \"cam{i}\"\naddr = \"127.0.0.1:{p}\"\n"))
        .collect()
}

/// Runs R4 against `live`, started with [`config`]`(tcp)`.
pub async fn r4(live: &mut Live, tcp: [u16; TCP_LISTENERS], plan: &Plan) -> Result<R4, BoxError> {
    let pid = live.pid();
    let http = live.server.http.clone();
    let mut r = R4 {
        viewers: plan.viewers,
        idle_opened: 0,
        ..Default::default()
    };
    // The source's packager, started before the flood asks for parts.
    let (status, body) =
        crate::http_get(&http, &format!("/hls/{STREAM}/source/index.m3u8")).await?;
    if status != 200 {
        return Err(format!("LL-HLS playlist: {status} {body}").into());
    }
    let group = Group::join(
        &http,
        "",
        plan.viewers,
        250,
        super::capacity(plan.window.as_secs_f64() + 30.0),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.rss_before = rss_bytes(pid)?;
    let stop_rss = CancellationToken::new();
    let rss = sample_rss(pid, Duration::from_millis(500), stop_rss.clone());
    group.record(true);
    let t0 = Instant::now();

    // 10,000 (or so) idle sockets from one address, all at once.
    let mut idle = Vec::with_capacity(plan.idle_sockets);
    for _ in 0..plan.idle_sockets {
        match connect_from(loopback(3), &http).await {
            Ok(s) => idle.push(s),
            Err(e) => return Err(format!("idle socket {}: {e}", idle.len()).into()),
        }
    }
    r.idle_opened = idle.len();
    // A socket closed at accept reads its end within moments; a held one reads nothing.
    let closed_at_once = futures_util::future::join_all(idle.iter_mut().map(|s| async move {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }))
    .await
    .into_iter()
    .filter(|c| *c)
    .count();
    r.idle_closed_at_once = closed_at_once;

    let stop = CancellationToken::new();
    let mut attacks = Vec::new();
    let mut next_ip = 10u8;
    for (kind, tcp) in [Kind::Garbage, Kind::Oversize, Kind::Slowloris]
        .into_iter()
        .zip(tcp)
    {
        for (port, addr) in [
            (Port::Rtmp, live.server.rtmp.clone()),
            (Port::Http, http.clone()),
            (Port::Tcp, format!("127.0.0.1:{tcp}")),
        ] {
            let tally = Arc::new(Tally::default());
            let ip = loopback(next_ip);
            next_ip += 1;
            let tasks: Vec<_> = (0..plan.per_port)
                .map(|_| {
                    tokio::spawn(attacker(
                        kind,
                        port,
                        addr.clone(),
                        ip,
                        stop.clone(),
                        tally.clone(),
                    ))
                })
                .collect();
            attacks.push((format!("{kind:?} on {port:?}").to_lowercase(), tally, tasks));
        }
    }
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let flood = tokio::spawn(hls_flood(
        http.clone(),
        loopback(4),
        plan.held_hls,
        stop.clone(),
        counts.clone(),
    ));

    // Halfway, another address must still be served.
    tokio::time::sleep(plan.window / 2).await;
    let (v, a, h, m) = other_address(live).await?;
    (
        r.other_viewer_ms,
        r.other_api_ms,
        r.other_hls_ms,
        r.other_rtmp_ms,
    ) = (v, a, h, m);
    tokio::time::sleep(plan.window / 2).await;
    stop.cancel();
    drop(idle);
    for (name, tally, tasks) in attacks {
        for t in tasks {
            let _ = t.await;
        }
        r.attacks.push(Attack {
            name,
            connections: tally.connections.load(Ordering::Relaxed),
            ended_by_server: tally.ended.load(Ordering::Relaxed),
            outlasted: tally.outlasted.load(Ordering::Relaxed),
            longest_s: tally.longest_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        });
    }
    let _ = flood.await;
    r.hls_200 = counts[0].load(Ordering::Relaxed);
    r.hls_503 = counts[1].load(Ordering::Relaxed);
    r.hls_refused = counts[2].load(Ordering::Relaxed);
    r.hls_other = counts[3].load(Ordering::Relaxed);
    group.record(false);
    r.window_s = t0.elapsed().as_secs_f64();
    stop_rss.cancel();
    let samples = rss.await?;
    let half = r.window_s / 2.0;
    r.rss_max_first_half = samples
        .iter()
        .filter(|s| s.0 <= half)
        .map(|s| s.1)
        .max()
        .unwrap_or(0);
    r.rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    r.seen = Seen::of(group.finish().await);
    live.feed.check().await?;
    r.server_up = live.server.still_running() && live.api_viewers().await.is_ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.rss_after = rss_bytes(pid)?;
    let (_, metrics) = crate::http_get(&http, "/metrics").await?;
    r.refusals = metrics
        .lines()
        .filter(|l| {
            (l.starts_with("onair_connections_refused_total")
                || l.starts_with("onair_limit_refusals_total"))
                && !l.ends_with(" 0")
        })
        .map(str::to_string)
        .collect();
    Ok(r)
}
