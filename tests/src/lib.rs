//! Harness for onair's end-to-end tests: the real `onair` binary, real ffmpeg publishing over
//! RTMP, and a WebSocket viewer built on tokio-tungstenite (not the server's fastwebsockets).
//!
//! Missing peers are failures, never skips: `make test` installs them (scripts/setup.sh).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use onair_protocol::codec::aac::AudioSpecificConfig;
use onair_protocol::codec::avc::{self, AvcInfo};
use onair_protocol::wire::{Control, Message, StatusCode, TrackParams};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite;

pub mod browser;
pub mod load;
pub mod netns;
pub mod soak;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Path of the onair binary under test: `$E2E_ONAIR_BIN`, or the workspace's debug build.
/// (Not an `ONAIR_*` name: onair refuses unknown `ONAIR_*` variables.)
pub fn onair_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_ONAIR_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/onair");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p onair-server`; `make test` does)",
        bin.display()
    );
    bin
}

/// A loopback port that was free a moment ago: for a process that takes its port on the
/// command line (chromedriver, node-media-server, a server that must come back on its port).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The repository's web/ directory: the pages, and the player `make player` builds into it.
pub fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web")
}

/// Asserts the Wasm player is built. Browser tests fail, not skip, without it.
pub fn require_player() {
    let js = web_dir().join("player/onair.js");
    assert!(
        js.exists() && web_dir().join("player/onair_bg.wasm").exists(),
        "{} not found: build the player first (`make player`; `make test` does)",
        js.display()
    );
}

/// Asserts a real peer tool is installed. Tests fail, not skip, without it.
pub fn require_tool(name: &str) {
    let found = std::process::Command::new(name)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is not installed: run scripts/setup.sh (make test does)"
    );
}

/// A running onair server on ephemeral loopback ports, killed on drop.
pub struct Server {
    child: Child,
    pub rtmp: String,
    pub http: String,
    /// The SRT listener's address (UDP).
    pub srt: String,
    log: Arc<Mutex<Vec<String>>>,
    log_changed: Arc<Notify>,
}

impl Server {
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_with_env(extra, &[]).await
    }

    /// Starts the server with `extra` arguments and `env` variables, and no other `ONAIR_*`
    /// variables from the test's environment.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_bin(&onair_bin(), extra, env).await
    }

    /// Starts the server with `toml` as its config file (written to the artifacts dir under a
    /// name of its own), then `extra` arguments and `env` variables.
    pub async fn start_with_config(toml: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = browser::artifacts_dir();
        std::fs::create_dir_all(&dir).expect("artifacts dir");
        let config = dir.join(format!(
            "config-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&config, toml).expect("write config");
        let config = config.to_string_lossy().to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        Self::start_with_env(&args, env).await
    }

    /// Like [`Server::start_with_env`], with the given binary (the benchmark runs a release build).
    pub async fn start_bin(bin: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ONAIR_") {
                cmd.env_remove(k);
            }
        }
        // Ephemeral loopback ports unless the test picks its own (a restart on the same port).
        for (flag, default) in [
            ("--rtmp", "127.0.0.1:0"),
            ("--http", "127.0.0.1:0"),
            ("--srt", "127.0.0.1:0"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        let mut child = cmd
            .args(extra)
            .env("ONAIR_LOG", "info,onair_server=debug")
            .env("ONAIR_WEB_DIR", web_dir())
            .envs(std::env::var("E2E_ONAIR_LOG").map(|l| ("ONAIR_LOG", l)))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn onair");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_changed = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        {
            let log = log.clone();
            let log_changed = log_changed.clone();
            tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("E2E_LOG").is_some() {
                        eprintln!("[onair] {line}");
                    }
                    if let Some(i) = line.find("onair ready ") {
                        // `onair ready rtmp=ADDR http=ADDR srt=ADDR`
                        let addr = |key: &str| {
                            line[i..]
                                .split_whitespace()
                                .find_map(|kv| kv.strip_prefix(key))
                                .unwrap_or_default()
                                .to_string()
                        };
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send((addr("rtmp="), addr("http="), addr("srt=")));
                        }
                    }
                    log.lock().expect("log lock").push(line);
                    log_changed.notify_waiters();
                }
            });
        }
        let ready = tokio::time::timeout(Duration::from_secs(20), ready_rx).await;
        let Ok(Ok((rtmp, http, srt))) = ready else {
            panic!(
                "onair did not become ready: {ready:?}; its output:\n{}",
                log.lock().expect("log lock").join("\n")
            );
        };
        Server {
            child,
            rtmp,
            http,
            srt,
            log,
            log_changed,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("server running")
    }

    pub fn rtmp_url(&self, stream: &str) -> String {
        format!("rtmp://{}/live/{stream}", self.rtmp)
    }

    pub fn ws_url(&self, stream: &str) -> String {
        format!("ws://{}/ws/{stream}", self.http)
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits for a log line containing `needle`; returns it.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_log_since(0, needle, timeout).await
    }

    /// How many lines the server has logged so far.
    pub fn log_lines(&self) -> usize {
        self.log.lock().expect("log lock").len()
    }

    /// Every line of the log containing `needle`.
    pub fn log_matching(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().expect("log lock");
        log.iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for a log line containing `needle` among the lines from number `from` on (see
    /// [`Server::log_lines`]); returns it.
    pub async fn wait_log_since(&self, from: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.log_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .skip(from)
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, notified).await.is_err() {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                    self.log.lock().expect("log lock").join("\n")
                );
            }
        }
    }

    /// Resident set size of the server, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        load::rss_bytes(self.pid()).expect("read the server's RSS from /proc")
    }

    pub async fn api(&self, path: &str) -> serde_json::Value {
        let body = http_get(&self.http, path).await.expect("api request");
        serde_json::from_str(&body.1).unwrap_or_else(|e| panic!("{path}: {e}: {}", body.1))
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("onair did not exit within 10 s of SIGTERM")
            .expect("wait")
    }

    pub fn still_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), BoxError> {
    http_request(addr, "GET", path, &[]).await
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), BoxError> {
    let r = http_fetch(addr, method, path, headers).await?;
    Ok((r.status, String::from_utf8_lossy(&r.body).to_string()))
}

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to the end (not for chunked bodies).
pub async fn http_fetch(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, BoxError> {
    http_send(addr, method, path, headers, &[]).await
}

/// Like [`http_fetch`], with a request body (its `Content-Length` is added).
pub async fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    })
}

/// How ffmpeg encodes the test source.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Keyframe interval in frames.
    pub gop: u32,
    /// `-tune zerolatency` (no B-frames); otherwise x264 defaults, with B-frames.
    pub zerolatency: bool,
    pub audio: bool,
    /// Video bitrate in kbit/s, or x264's default rate control.
    pub bitrate_kbps: Option<u32>,
}

impl Profile {
    /// The source of the ladder tests and the ABR benchmark: 720p30, x264 at 2500 kbit/s, a
    /// keyframe every second, with audio (about 2.6 Mbit/s on the wire).
    pub fn hd_ladder_source() -> Profile {
        Profile {
            width: 1280,
            height: 720,
            gop: 30,
            bitrate_kbps: Some(2500),
            ..Profile::default()
        }
    }
}

/// A config giving every stream a 480p rung (the preset, 1000 kbit/s) and a 240p one at
/// 300 kbit/s.
pub const LADDER_480_240: &str =
    "[streams.\"*\"]\nladder = [\"480p\", { name = \"240p\", height = 240, video_kbps = 300 }]\n";

impl Default for Profile {
    fn default() -> Self {
        Self {
            width: 640,
            height: 360,
            fps: 30,
            gop: 30,
            zerolatency: true,
            audio: true,
            bitrate_kbps: None,
        }
    }
}

/// The path of PyPI's static ffmpeg 9 (`imageio-ffmpeg==0.8.1`, which scripts/setup.sh
/// installs): the publisher for what Debian's 5.1 cannot send (Enhanced RTMP: HEVC, AV1,
/// multitrack). Fails, not skips, without it.
pub fn ffmpeg9() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())",
        ])
        .output()
        .expect("run python3");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.exists(),
        "ffmpeg 9 (pip imageio-ffmpeg==0.8.1) is not installed: run scripts/setup.sh (make test does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// A real ffmpeg publishing a synthetic stream over RTMP, killed on drop.
pub struct Publisher {
    pub child: Child,
}

impl Publisher {
    pub fn start(url: &str, p: Profile) -> Publisher {
        require_tool("ffmpeg");
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"]);
        cmd.args([
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={}x{}:rate={}", p.width, p.height, p.fps),
        ]);
        if p.audio {
            cmd.args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]);
        }
        cmd.args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-g",
            &p.gop.to_string(),
        ]);
        if p.zerolatency {
            cmd.args(["-preset", "veryfast", "-tune", "zerolatency"]);
        }
        if let Some(kbps) = p.bitrate_kbps {
            cmd.args([
                "-b:v",
                &format!("{kbps}k"),
                "-maxrate",
                &format!("{kbps}k"),
                "-bufsize",
                &format!("{}k", kbps / 2),
            ]);
        }
        if p.audio {
            cmd.args(["-c:a", "aac", "-b:a", "96k"]);
        }
        cmd.args(["-f", "flv", url]);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ffmpeg");
        Publisher { child }
    }

    /// Waits for ffmpeg to exit and returns (status, stderr).
    pub async fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("ffmpeg did not exit in time")
            .expect("wait ffmpeg");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        (status, err)
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One received protocol message, owned, with its arrival time.
#[derive(Debug, Clone)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub at: SystemTime,
}

impl Received {
    pub fn msg(&self) -> Message<'_> {
        Message::decode(&self.bytes)
            .unwrap_or_else(|e| panic!("undecodable message from server: {e}"))
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket viewer built on tokio-tungstenite.
pub struct Viewer {
    ws: Ws,
}

/// What a viewer may see end a connection.
#[derive(Debug)]
pub enum Next {
    Message(Received),
    Closed(Option<(u16, String)>),
}

impl Viewer {
    pub async fn connect(url: &str) -> Viewer {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        Viewer { ws }
    }

    /// The next protocol message or the close, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Next {
        loop {
            let m = tokio::time::timeout(timeout, self.ws.next())
                .await
                .expect("no message from the server in time");
            match m {
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    return Next::Message(Received {
                        bytes: b.to_vec(),
                        at: SystemTime::now(),
                    });
                }
                Some(Ok(tungstenite::Message::Close(c))) => {
                    return Next::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())));
                }
                Some(Ok(tungstenite::Message::Text(t))) => panic!("unexpected text frame {t}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("websocket error: {e}"),
                None => return Next::Closed(None),
            }
        }
    }

    pub async fn recv(&mut self, timeout: Duration) -> Received {
        match self.next(timeout).await {
            Next::Message(m) => m,
            Next::Closed(c) => panic!("connection closed: {c:?}"),
        }
    }

    pub async fn send(&mut self, msg: &Message<'_>) {
        use futures_util::SinkExt;
        let bytes = msg.to_vec().expect("encode");
        self.ws
            .send(tungstenite::Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// Sends raw bytes as one binary message (for malformed input).
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.try_send_bytes(bytes).await.expect("send");
    }

    /// Like [`Viewer::send_bytes`], for input the server may refuse mid-way (a flood): once it
    /// has closed the connection, a send fails.
    pub async fn try_send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), tungstenite::Error> {
        use futures_util::SinkExt;
        self.ws
            .send(tungstenite::Message::Binary(bytes.into()))
            .await
    }

    /// Reads until the server closes; returns the close code and reason. Panics on timeout.
    pub async fn wait_close(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left.max(Duration::from_millis(1))).await {
                Next::Message(_) => continue,
                Next::Closed(c) => return c,
            }
        }
    }

    /// Keeps reading in the background (a viewer that keeps up), until dropped or closed.
    /// Returns the task; abort it to disconnect.
    pub fn drain(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(Ok(m)) = self.ws.next().await {
                if matches!(m, tungstenite::Message::Close(_)) {
                    return;
                }
            }
        })
    }

    /// Reads for `d`; returns the video frames received, having checked that their dts only
    /// grow (from `last`, the dts of the video frame before, if any).
    pub async fn continuous_video(&mut self, d: Duration, mut last: Option<u64>) -> usize {
        let from = Instant::now();
        let mut frames = 0;
        while from.elapsed() < d {
            if let Message::Media { header, .. } = self.recv(Duration::from_secs(10)).await.msg()
                && header.track == 0
            {
                assert!(
                    last.is_none_or(|l| header.dts > l),
                    "video dts {} after {last:?}",
                    header.dts
                );
                last = Some(header.dts);
                frames += 1;
            }
        }
        frames
    }

    /// Receives until a message satisfies `pred`; returns everything received, that one last.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Message<'_>) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.recv(left.max(Duration::from_millis(1))).await;
            let done = pred(&r.msg());
            got.push(r);
            if done {
                return got;
            }
        }
    }
}

/// The dashboard's Server-Sent Events feed (`/api/events`), read as a client would.
pub struct Feed {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
}

impl Feed {
    /// Opens `/api/events?QUERY`.
    pub async fn open(addr: &str, query: &str) -> Feed {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the feed");
        let req = format!(
            "GET /api/events?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let mut lines = BufReader::new(s).lines();
        let status = lines.next_line().await.expect("read").unwrap_or_default();
        assert!(status.contains(" 200 "), "feed refused: {status}");
        Feed { lines }
    }

    /// The next event: (name, JSON data). Chunked transfer framing lines are skipped.
    pub async fn next(&mut self, timeout: Duration) -> (String, serde_json::Value) {
        let deadline = Instant::now() + timeout;
        let mut event = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .expect("no feed event in time")
                .expect("read the feed")
                .expect("the feed ended");
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v = serde_json::from_str(d).unwrap_or_else(|e| panic!("feed data {e}: {d}"));
                return (event, v);
            }
        }
    }

    /// The next `snapshot` for which `pred` holds, within `timeout`.
    pub async fn snapshot_where(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.next(left)).await;
            let Ok((event, v)) = next else { break };
            if event == "snapshot" {
                if pred(&v) {
                    return v;
                }
                last = v;
            }
        }
        panic!("{what}: not seen within {timeout:?}; last snapshot: {last}");
    }
}

/// The value of one sample in a Prometheus text exposition, e.g.
/// `metric(&text, "onair_viewer_disconnects_total{reason=\"stalled\"}")`.
pub fn metric(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Microseconds since the Unix epoch of a SystemTime.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A viewer's session, checked as it goes: what a player relies on.
#[derive(Debug, Default)]
pub struct Recording {
    pub hello: bool,
    pub statuses: Vec<StatusCode>,
    pub inits: usize,
    pub video: Option<AvcInfo>,
    pub audio: Option<AudioSpecificConfig>,
    pub video_track: Option<u8>,
    pub audio_track: Option<u8>,
    /// (dts, cts, keyframe, ingest_us, received) of every video frame.
    pub video_frames: Vec<(u64, i16, bool, u64, SystemTime)>,
    pub audio_frames: Vec<(u64, u64)>,
    pub h264: Vec<u8>,
    pub adts: Vec<u8>,
    /// Whether the first media after the latest init was a keyframe, and of the video track
    /// when there is one (every AAC frame is flagged as a keyframe, so audio proves nothing).
    pub first_media_was_keyframe: Option<bool>,
    /// Every receipt interval the server asked for (control op 3), in order.
    pub receipts_asked: Vec<u16>,
}

impl Recording {
    /// Checks ordering invariants and records one message.
    pub fn push(&mut self, r: &Received) {
        match r.msg() {
            Message::Hello(h) => {
                assert!(!self.hello, "second hello");
                assert_eq!(h.version, onair_protocol::wire::VERSION);
                self.hello = true;
            }
            Message::Status(s) => {
                assert!(self.hello, "status before hello");
                self.statuses.push(s.code);
            }
            Message::Control(Control::Receipts { every_ms }) => {
                assert!(self.hello, "control before hello");
                self.receipts_asked.push(every_ms);
            }
            Message::Init(init) => {
                assert!(self.hello, "init before hello");
                self.inits += 1;
                self.video = None;
                self.audio = None;
                self.first_media_was_keyframe = None;
                for t in &init.tracks {
                    match t.params {
                        TrackParams::Video { width, height, .. } => {
                            let info = AvcInfo::parse(t.config).expect("init carries a valid avcC");
                            assert_eq!((info.width, info.height), (width as u32, height as u32));
                            assert_eq!(info.codec, t.codec);
                            self.video = Some(info);
                            self.video_track = Some(t.id);
                        }
                        TrackParams::Audio { sample_rate, .. } => {
                            let asc = AudioSpecificConfig::parse(t.config).expect("valid ASC");
                            assert_eq!(asc.sampling_frequency, sample_rate);
                            self.audio = Some(asc);
                            self.audio_track = Some(t.id);
                        }
                    }
                }
            }
            Message::Media { header, payload } => {
                assert!(self.hello && self.inits > 0, "media before hello and init");
                if self.first_media_was_keyframe.is_none() {
                    let right_track =
                        self.video_track.is_none() || Some(header.track) == self.video_track;
                    self.first_media_was_keyframe = Some(header.keyframe && right_track);
                }
                if Some(header.track) == self.video_track {
                    let info = self.video.as_ref().expect("video init");
                    let nals: Vec<&[u8]> = avc::nal_units(payload, info.length_size)
                        .collect::<Result<_, _>>()
                        .expect("well-formed AVCC payload");
                    let has_idr = nals.iter().any(|n| avc::nal_type(n) == avc::NAL_IDR);
                    assert_eq!(
                        header.keyframe, has_idr,
                        "keyframe flag matches IDR presence"
                    );
                    avc::avcc_to_annexb(
                        payload,
                        info.length_size,
                        header.keyframe.then_some(info),
                        &mut self.h264,
                    )
                    .expect("annex b");
                    self.video_frames.push((
                        header.dts,
                        header.cts,
                        header.keyframe,
                        header.ingest_us,
                        r.at,
                    ));
                } else if Some(header.track) == self.audio_track {
                    let asc = self.audio.as_ref().expect("audio init");
                    self.adts
                        .extend_from_slice(&asc.adts_header(payload.len()).expect("adts"));
                    self.adts.extend_from_slice(payload);
                    self.audio_frames.push((header.dts, header.ingest_us));
                } else {
                    panic!("media on unknown track {}", header.track);
                }
            }
            other => panic!("unexpected {} from server", other.kind_name()),
        }
    }

    /// Video dts strictly increase and never step by more than `max_step` (no lost frames).
    pub fn assert_video_continuous(&self, max_step: u64) {
        for w in self.video_frames.windows(2) {
            assert!(
                w[1].0 > w[0].0,
                "video dts must increase: {} then {}",
                w[0].0,
                w[1].0
            );
            assert!(
                w[1].0 - w[0].0 <= max_step,
                "gap in video: dts {} then {}",
                w[0].0,
                w[1].0
            );
        }
    }

    pub fn assert_audio_continuous(&self, max_step: u64) {
        for w in self.audio_frames.windows(2) {
            assert!(w[1].0 > w[0].0, "audio dts must increase");
            assert!(
                w[1].0 - w[0].0 <= max_step,
                "gap in audio: {} then {}",
                w[0].0,
                w[1].0
            );
        }
    }
}

/// How a viewer's playback began: its init's rendition, video codec string and picture size,
/// whether the init has audio, and whether the first media after it was a video keyframe.
#[derive(Debug, Clone)]
pub struct Start {
    pub rendition: u8,
    pub codec: String,
    pub size: (u16, u16),
    pub audio: bool,
    pub keyframe_first: bool,
}

/// What a viewer connected before a publish must get: `frames` video frames in a row,
/// keyframe first, at 640x360 with a codec string starting `codec`, none missing or out of
/// order (dts steps of at most `frame_ms`), more than a third with a composition offset (the
/// encoder's B-frames), and more than 100 AAC frames beside them.
pub async fn every_frame_with_cts(viewer: &mut Viewer, codec: &str, frames: usize, frame_ms: u64) {
    let t = Duration::from_secs(20);
    let got = viewer
        .recv_until(
            t,
            |m| matches!(m, Message::Media { header, .. } if header.track == 0),
        )
        .await;
    let start = start_of(&got);
    assert!(start.codec.starts_with(codec), "{}", start.codec);
    assert_eq!(start.size, (640, 360));
    assert!(start.keyframe_first, "keyframe first");
    assert!(start.audio, "AAC carried");
    let (mut video, mut with_cts, mut audio) = (1, 0, 0);
    let mut last = None;
    while video < frames {
        let next = tokio::time::timeout(Duration::from_secs(8), viewer.recv(t)).await;
        let Ok(r) = next else {
            panic!("{video} of {frames} video frames, {audio} audio");
        };
        match r.msg() {
            Message::Media { header, .. } if header.track == 0 => {
                assert!(
                    last.is_none_or(|l| header.dts > l && header.dts - l <= frame_ms),
                    "a frame missing or out of order: dts {} after {last:?}",
                    header.dts
                );
                last = Some(header.dts);
                video += 1;
                with_cts += usize::from(header.cts != 0);
            }
            Message::Media { .. } => audio += 1,
            _ => {}
        }
    }
    assert!(with_cts > frames / 3, "B-frames keep their cts: {with_cts}");
    assert!(audio > 100, "{audio} AAC frames");
}

/// [`Start`] of what a viewer received, up to its first media frame (the last init before it
/// counts). Panics without an init with video before media, or without media.
pub fn start_of(got: &[Received]) -> Start {
    let mut start: Option<Start> = None;
    for r in got {
        match r.msg() {
            Message::Init(init) => {
                let (codec, size) = init
                    .tracks
                    .iter()
                    .find_map(|t| match t.params {
                        TrackParams::Video { width, height, .. } => {
                            Some((t.codec.to_string(), (width, height)))
                        }
                        _ => None,
                    })
                    .expect("a video track in the init");
                start = Some(Start {
                    rendition: init.rendition,
                    codec,
                    size,
                    audio: init
                        .tracks
                        .iter()
                        .any(|t| matches!(t.params, TrackParams::Audio { .. })),
                    keyframe_first: false,
                });
            }
            Message::Media { header, .. } => {
                let mut s = start.expect("media before any init");
                s.keyframe_first = header.track == 0 && header.keyframe;
                return s;
            }
            _ => {}
        }
    }
    panic!("no media received");
}

/// ffprobe reads the LL-HLS at `url` and finds video in `codec_name` (ffprobe's name: `h264`,
/// `hevc`, `av1`) at `size`, and AAC; ffmpeg then decodes `secs` seconds of it without a word
/// of complaint.
pub async fn hls_decodes(url: &str, codec_name: &str, size: (u64, u64), secs: u32) {
    require_tool("ffprobe");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name,width,height",
        ])
        .args(["-of", "json", url])
        .output()
        .await
        .expect("run ffprobe");
    assert!(
        probe.status.success() && probe.stderr.is_empty(),
        "{url}: ffprobe: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&probe.stdout).expect("ffprobe json");
    let streams = found["streams"].as_array().expect("streams");
    let video = streams
        .iter()
        .find(|s| s["codec_name"] == codec_name)
        .unwrap_or_else(|| panic!("{url}: no {codec_name} in {found}"));
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(size.0), Some(size.1)),
        "{found}"
    );
    assert!(
        streams.iter().any(|s| s["codec_name"] == "aac"),
        "{url}: no aac in {found}"
    );
    let decode = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", url])
        .args(["-t", &secs.to_string(), "-f", "null", "-"])
        .output()
        .await
        .expect("run ffmpeg");
    let errors = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && errors.trim().is_empty(),
        "{url}: ffmpeg reports errors:\n{errors}"
    );
}

/// A temporary directory (`onair-PREFIX-NAME-PID` under the system's), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str, name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("onair-{prefix}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command to completion; panics with its error output unless it succeeded.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Decodes a file with ffmpeg; returns ffmpeg's error output (empty when clean).
pub async fn ffmpeg_decode_errors(format: &str, data: &[u8]) -> String {
    require_tool("ffmpeg");
    let mut f = tempfile(format);
    f.1.write_all(data).expect("write temp");
    drop(f.1);
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-f", format, "-i"])
        .arg(&f.0)
        .args(["-f", "null", "-"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run ffmpeg");
    let _ = std::fs::remove_file(&f.0);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() && err.is_empty() {
        return format!("ffmpeg exited with {}", out.status);
    }
    err
}

fn tempfile(ext: &str) -> (PathBuf, std::fs::File) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("onair-test-{}-{n}.{ext}", std::process::id()));
    let f = std::fs::File::create(&p).expect("create temp file");
    (p, f)
}
