//! One configuration, three sources: command line, `ONAIR_*` environment variables and a TOML
//! file, in that order of precedence, over built-in defaults. The same key names work everywhere
//! (`--max-lag-ms`, `ONAIR_MAX_LAG_MS`, `max_lag_ms = …`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};

/// The keys that hold secrets.
const SECRETS: [&str; 4] = ["admin_token", "jwt_secret", "read_token", "srt_passphrase"];
use serde::Deserialize;

/// Every key, as given on the command line, in the environment or in the file. `None` means
/// "not set here"; [`Config::resolve`] applies precedence and defaults.
#[derive(Debug, Default, Clone, Parser, Deserialize)]
#[command(
    name = "onair",
    version,
    about = "onair: low-latency live video. Publish RTMP to rtmp://HOST:1935/live/STREAM, \
             watch at http://HOST:8080/watch/STREAM or ws://HOST:8080/ws/STREAM.",
    after_help = "Every option can also be set as an ONAIR_* environment variable (shown per \
                  option) or as a key of the same name, with underscores, in the TOML file given \
                  by --config. Precedence: command line, environment, file, default. Unknown keys \
                  and ONAIR_* variables are an error."
)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of the keys below.
    #[arg(long, env = "ONAIR_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// RTMP listen address (publishers). [default: 0.0.0.0:1935, the standard RTMP port]
    #[arg(long, env = "ONAIR_RTMP", value_name = "ADDR")]
    pub rtmp: Option<SocketAddr>,

    /// HTTP/WebSocket listen address (viewers, API, pages). [default: 0.0.0.0:8080]
    #[arg(long, env = "ONAIR_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// RTMP application name publishers must use, as in rtmp://HOST/APP/STREAM. [default: live]
    #[arg(long, env = "ONAIR_RTMP_APP", value_name = "NAME")]
    pub rtmp_app: Option<String>,

    /// SRT listen address (UDP; publishers in live mode, MPEG-TS). The stream name comes from
    /// the streamid: `publish:NAME` or `#!::r=NAME,m=publish`. [default: 0.0.0.0:8890]
    #[arg(long, env = "ONAIR_SRT", value_name = "ADDR")]
    pub srt: Option<SocketAddr>,

    /// Passphrase every SRT publisher must encrypt with (10 to 79 characters); a caller
    /// without it, or with another, is refused in the handshake. [default: unset: none]
    #[arg(
        long,
        env = "ONAIR_SRT_PASSPHRASE",
        value_name = "PASSPHRASE",
        hide_env_values = true
    )]
    pub srt_passphrase: Option<String>,

    /// SRT receive latency: how long the server waits for a lost packet's retransmission
    /// before it gives up on it. The caller's own latency counts too: the larger one holds.
    /// [default: 120, libsrt's]
    #[arg(long, env = "ONAIR_SRT_LATENCY_MS", value_name = "MS")]
    pub srt_latency_ms: Option<u64>,

    /// Bytes of media kept per rendition: the GOP cache plus the room a slow viewer may fall
    /// behind before it skips to the next keyframe. [default: 16777216, 16 MiB: ~20 s of a
    /// 6 Mbps stream, so a 10 s GOP still fits]
    #[arg(long, env = "ONAIR_MAX_BACKLOG_BYTES", value_name = "BYTES")]
    pub max_backlog_bytes: Option<u64>,

    /// A viewer that has not caught up with the live edge for this long skips to the next
    /// keyframe. [default: 3000: past that, late frames are worth less than a fresh keyframe]
    #[arg(long, env = "ONAIR_MAX_LAG_MS", value_name = "MS")]
    pub max_lag_ms: Option<u64>,

    /// A viewer whose socket accepts no bytes for this long is disconnected. [default: 10000:
    /// long enough for a mobile network hiccup]
    #[arg(long, env = "ONAIR_STALL_TIMEOUT_MS", value_name = "MS")]
    pub stall_timeout_ms: Option<u64>,

    /// Time an RTMP client has from connecting to starting to publish. [default: 10000]
    #[arg(long, env = "ONAIR_RTMP_HANDSHAKE_TIMEOUT_MS", value_name = "MS")]
    pub rtmp_handshake_timeout_ms: Option<u64>,

    /// A publisher that sends nothing for this long is disconnected. [default: 15000]
    #[arg(long, env = "ONAIR_RTMP_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub rtmp_idle_timeout_ms: Option<u64>,

    /// A raw H.264 source (WebSocket or TCP) that sends no IDR frame for this long from the
    /// start is refused: no viewer could ever start on it. [default: 10000]
    #[arg(long, env = "ONAIR_INGEST_IDR_TIMEOUT_MS", value_name = "MS")]
    pub ingest_idr_timeout_ms: Option<u64>,

    /// Origins allowed to open WebSockets, comma-separated (e.g. https://example.com). Empty
    /// allows any origin, as a public player embedded anywhere needs. [default: empty]
    #[arg(
        long,
        env = "ONAIR_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// Token for the API's mutating calls (`DELETE /api/streams/NAME`), sent as
    /// `Authorization: Bearer TOKEN`. Unset, those calls are refused: set a long random string,
    /// e.g. `ONAIR_ADMIN_TOKEN=$(openssl rand -hex 24)`. [default: unset]
    #[arg(
        long,
        env = "ONAIR_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Secret that signs publish and play tokens (HS256 JWTs with `sub` = stream or `*`,
    /// `act` = `publish` or `play`, and `exp`), sent as `?token=` (RTMP: `STREAM?token=...`
    /// as the stream key). Set, every publish needs a token or the stream's `publish_key`.
    /// [default: unset]
    #[arg(
        long,
        env = "ONAIR_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Token for reading: `GET /api/*`, `/api/events`, `/dashboard` and `/metrics`, sent as
    /// `Authorization: Bearer TOKEN` (or `?token=`, which the dashboard page keeps for its
    /// feed). Unset, they are open. [default: unset]
    #[arg(
        long,
        env = "ONAIR_READ_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub read_token: Option<String>,

    /// An HTTP service that decides what the key and tokens do not admit: onair POSTs
    /// `{"action","stream","protocol","addr","token"}` as JSON and admits on a 2xx answer
    /// within 2 s (answers are kept for 5 s). Set, publishing is no longer open. An
    /// `http://` URL (a service beside onair). [default: unset]
    #[arg(long, env = "ONAIR_AUTH_HOOK_URL", value_name = "URL")]
    pub auth_hook_url: Option<String>,

    /// Connections held at most, every listener together (viewers, publishers, HTTP
    /// requests); more are closed at accept. [default: 16384]
    #[arg(long, env = "ONAIR_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections one address may have that have not finished their handshake (HTTP request
    /// head, RTMP handshake and publish, a TCP source's first bytes). [default: 256]
    #[arg(long, env = "ONAIR_MAX_HANDSHAKES_PER_ADDRESS", value_name = "N")]
    pub max_handshakes_per_address: Option<usize>,

    /// LL-HLS part target, ms: how often a new part is ready (and the latency floor of HLS
    /// players, which hold back three parts). [default: 200]
    #[arg(long, env = "ONAIR_HLS_PART_MS", value_name = "MS")]
    pub hls_part_ms: Option<u32>,

    /// LL-HLS segment target, ms; segments start at keyframes, so a longer GOP makes longer
    /// segments. [default: 2000]
    #[arg(long, env = "ONAIR_HLS_SEGMENT_MS", value_name = "MS")]
    pub hls_segment_ms: Option<u32>,

    /// Complete segments each HLS playlist keeps, in memory. [default: 10: 20 s, room for
    /// delta updates, which skip what is older than six segments]
    #[arg(long, env = "ONAIR_HLS_SEGMENTS", value_name = "N")]
    pub hls_segments: Option<u32>,

    /// How long an ended stream's HLS stays served (players finish, CDNs revalidate) before its
    /// URLs answer 404. [default: 30000]
    #[arg(long, env = "ONAIR_HLS_GRACE_MS", value_name = "MS")]
    pub hls_grace_ms: Option<u64>,

    /// Directory with the web pages (`index.html`, `watch.html`) and the built player
    /// (`player/`, made by `make player`). [default: web, the repository's web/ when run from
    /// the checkout as `make run` does]
    #[arg(long, env = "ONAIR_WEB_DIR", value_name = "DIR")]
    pub web_dir: Option<PathBuf>,

    /// Log filter, in tracing's EnvFilter syntax. h264-reader's own log (a line for every byte
    /// of a stream that is not H.264) is off unless the filter names `h264_reader`: a peer's
    /// bytes must never be able to flood the log. [default: info]
    #[arg(long, env = "ONAIR_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Per-stream settings, in the TOML file only: `[streams.NAME]`, or `[streams."*"]` for
    /// every stream without a table of its own.
    #[arg(skip)]
    pub streams: Option<BTreeMap<String, StreamSettings>>,

    /// Sources the server connects to, in the TOML file only: `[[pull]] name = "cam1",
    /// url = "tcp://10.0.0.5:1025"` (raw H.264 or FLV, told apart by their first bytes;
    /// optionally `fps = 30`), or any URL or file ffmpeg reads (`url = "rtsp://..."`, and
    /// optionally `on_demand = true`). Reconnected with backoff when they drop.
    #[arg(skip)]
    pub pull: Option<Vec<PullSource>>,

    /// TCP ports that take a pushed stream, in the TOML file only: `[[listen]] name = "cam2",
    /// addr = "0.0.0.0:1026"` (and optionally `fps = 25`).
    #[arg(skip)]
    pub listen: Option<Vec<ListenSource>>,
}

/// `[[pull]]`: a camera or encoder the server connects to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PullSource {
    pub name: String,
    /// `tcp://HOST:PORT` (raw H.264 or FLV), or anything ffmpeg reads: `rtsp://`, `http(s)://`
    /// (HLS, FLV), `srt://`, `rtmp://`, or an absolute path to a file (played in a loop).
    pub url: String,
    /// Frame rate for raw H.264 timestamps; else the SPS timing, else arrival time.
    pub fps: Option<f64>,
    /// Start the source on the stream's first viewer, stop it a while after the last left
    /// (not for `tcp://`). [default: false]
    #[serde(default)]
    pub on_demand: bool,
}

/// `[[listen]]`: a port a source pushes raw H.264 or FLV to; one stream name per address.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenSource {
    pub name: String,
    pub addr: SocketAddr,
    pub fps: Option<f64>,
    /// Addresses or networks (`10.0.0.0/8`) that may connect; others are refused at once.
    /// [default: any]
    pub allow: Option<Vec<String>>,
}

/// `[streams.NAME]` in the TOML file.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Synchronized playback: every player presents the frame ingested at T at wall time
    /// T + `latency_ms`, so all viewers show the same frame at the same moment.
    #[serde(default)]
    pub sync: bool,
    /// The latency every player of a synchronized stream holds. [default: 500]
    pub latency_ms: Option<u32>,
    /// The renditions an ffmpeg child makes from the source: preset names (`"1080p"`,
    /// `"720p"`, `"480p"`, `"360p"`, `"240p"`) or tables `{ name, height, video_kbps, fps }`.
    /// `[]` turns it off. [default: the presets below the source's height, at most two]
    pub ladder: Option<Vec<LadderEntry>>,
    /// The key a publisher must give as `?token=` (RTMP: `STREAM?token=KEY` as the stream
    /// key). Unset here, the `"*"` table's applies. [default: unset: open, unless
    /// `jwt_secret` is set]
    pub publish_key: Option<String>,
    /// `"token"`: viewers need a play token (`act` = `play`) on `/ws/STREAM`, HLS and the
    /// watch page. Unset here, the `"*"` table's applies. [default: `"open"`]
    pub play: Option<PlayPolicy>,
}

/// Who may play a stream.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PlayPolicy {
    Open,
    Token,
}

/// One entry of a `ladder`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LadderEntry {
    Preset(String),
    Rung(RungSettings),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RungSettings {
    pub name: String,
    pub height: u32,
    pub video_kbps: u32,
    pub fps: Option<f64>,
}

/// A ladder rung, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Rung {
    pub name: String,
    pub height: u32,
    pub video_kbps: u32,
    /// None: the source's frame rate.
    pub fps: Option<f64>,
}

/// The ladder presets: name, height, video kbit/s. The bitrates are those of common H.264
/// ladders for live (x264 veryfast, 30 fps); audio is copied on top.
pub const PRESETS: [(&str, u32, u32); 5] = [
    ("1080p", 1080, 4500),
    ("720p", 720, 2500),
    ("480p", 480, 1000),
    ("360p", 360, 600),
    ("240p", 240, 300),
];

/// The default ladder: this many presets, the highest below the source's height.
pub const DEFAULT_RUNGS: usize = 2;

impl LadderEntry {
    fn resolve(&self) -> Result<Rung, String> {
        match self {
            LadderEntry::Preset(p) => PRESETS
                .iter()
                .find(|(n, _, _)| n == p)
                .map(|&(name, height, video_kbps)| Rung {
                    name: name.to_string(),
                    height,
                    video_kbps,
                    fps: None,
                })
                .ok_or_else(|| {
                    format!(
                        "unknown preset {p:?} (presets: {})",
                        PRESETS.map(|p| p.0).join(", ")
                    )
                }),
            LadderEntry::Rung(r) => {
                if !crate::hub::valid_stream_name(&r.name) || r.name == crate::hub::SOURCE {
                    return Err(format!("{:?} is not a valid rung name", r.name));
                }
                if !(64..=4320).contains(&r.height) || r.height % 2 != 0 {
                    return Err(format!("height {} must be even, 64 to 4320", r.height));
                }
                if !(50..=100_000).contains(&r.video_kbps) {
                    return Err(format!("video_kbps {} must be 50 to 100000", r.video_kbps));
                }
                if r.fps.is_some_and(|f| !(1.0..=240.0).contains(&f)) {
                    return Err("fps must be 1 to 240".to_string());
                }
                Ok(Rung {
                    name: r.name.clone(),
                    height: r.height,
                    video_kbps: r.video_kbps,
                    fps: r.fps,
                })
            }
        }
    }
}

/// A ladder's entries, resolved; an entry that does not resolve, or a name twice, is an error.
pub fn resolve_ladder(entries: &[LadderEntry]) -> Result<Vec<Rung>, String> {
    let mut rungs: Vec<Rung> = Vec::new();
    for entry in entries {
        let rung = entry.resolve()?;
        if rungs.iter().any(|r| r.name == rung.name) {
            return Err(format!("rung {:?} twice", rung.name));
        }
        rungs.push(rung);
    }
    Ok(rungs)
}

/// The rungs to make from a source `source_height` pixels high: the configured ones below it,
/// or (unset) the default ladder; highest first.
pub fn plan_ladder(configured: Option<&[Rung]>, source_height: u32) -> Vec<Rung> {
    let mut rungs: Vec<Rung> = match configured {
        Some(rungs) => rungs
            .iter()
            .filter(|r| r.height < source_height)
            .cloned()
            .collect(),
        None => PRESETS
            .iter()
            .filter(|(_, h, _)| *h < source_height)
            .take(DEFAULT_RUNGS)
            .map(|&(name, height, video_kbps)| Rung {
                name: name.to_string(),
                height,
                video_kbps,
                fps: None,
            })
            .collect(),
    };
    rungs.sort_by_key(|r| std::cmp::Reverse(r.height));
    rungs
}

/// What applies to one stream, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamPolicy {
    pub sync: bool,
    pub latency_ms: u32,
    /// None: the default ladder.
    pub ladder: Option<Vec<Rung>>,
}

/// Default latency of a synchronized stream: room for viewers a few hops away to keep up.
pub const DEFAULT_SYNC_LATENCY_MS: u32 = 500;

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub rtmp: SocketAddr,
    pub http: SocketAddr,
    pub rtmp_app: String,
    pub srt: SocketAddr,
    pub srt_passphrase: Option<String>,
    pub srt_latency: Duration,
    pub max_backlog_bytes: u64,
    pub max_lag: Duration,
    pub stall_timeout: Duration,
    pub rtmp_handshake_timeout: Duration,
    pub rtmp_idle_timeout: Duration,
    pub ingest_idr_timeout: Duration,
    pub allowed_origins: Vec<String>,
    pub web_dir: PathBuf,
    pub admin_token: Option<String>,
    pub jwt_secret: Option<String>,
    pub read_token: Option<String>,
    pub auth_hook_url: Option<String>,
    pub max_connections: usize,
    pub max_handshakes_per_address: usize,
    /// Who may publish, play and read, resolved from the keys above and the stream tables.
    pub auth: crate::auth::Auth,
    /// Secrets given as command-line arguments, which anyone on the machine can read in `ps`:
    /// the server says so at start-up.
    pub secrets_on_command_line: Vec<&'static str>,
    pub hls_part_ms: u32,
    pub hls_segment_ms: u32,
    pub hls_segments: u32,
    pub hls_grace: Duration,
    pub log: String,
    pub streams: BTreeMap<String, StreamSettings>,
    pub pull: Vec<PullSource>,
    pub listen: Vec<ListenSource>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("unknown environment variable {0}; see `onair --help` for the ONAIR_* variables")]
    UnknownEnv(String),
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Config {
    /// Parses the command line and environment, reads the file if one is named, and resolves.
    /// Clap prints its own errors (bad values on the command line or in ONAIR_* variables) and
    /// exits; everything else is a [`ConfigError`].
    pub fn load() -> Result<Config, ConfigError> {
        check_env(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
        let matches = Settings::command().get_matches();
        let cli = Settings::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        let mut cfg = Config::resolve(cli, file)?;
        cfg.secrets_on_command_line = SECRETS
            .into_iter()
            .filter(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
            .collect();
        Ok(cfg)
    }

    pub fn resolve(cli: Settings, file: Settings) -> Result<Config, ConfigError> {
        macro_rules! pick {
            ($k:ident, $default:expr) => {
                cli.$k.or(file.$k).unwrap_or_else(|| $default)
            };
        }
        let cfg = Config {
            rtmp: pick!(rtmp, SocketAddr::from(([0, 0, 0, 0], 1935))),
            http: pick!(http, SocketAddr::from(([0, 0, 0, 0], 8080))),
            rtmp_app: pick!(rtmp_app, "live".to_string()),
            srt: pick!(srt, SocketAddr::from(([0, 0, 0, 0], 8890))),
            srt_passphrase: cli.srt_passphrase.or(file.srt_passphrase),
            srt_latency: Duration::from_millis(pick!(srt_latency_ms, 120)),
            max_backlog_bytes: pick!(max_backlog_bytes, 16 << 20),
            max_lag: Duration::from_millis(pick!(max_lag_ms, 3000)),
            stall_timeout: Duration::from_millis(pick!(stall_timeout_ms, 10_000)),
            rtmp_handshake_timeout: Duration::from_millis(pick!(rtmp_handshake_timeout_ms, 10_000)),
            rtmp_idle_timeout: Duration::from_millis(pick!(rtmp_idle_timeout_ms, 15_000)),
            ingest_idr_timeout: Duration::from_millis(pick!(ingest_idr_timeout_ms, 10_000)),
            allowed_origins: pick!(allowed_origins, Vec::new()),
            web_dir: pick!(web_dir, PathBuf::from("web")),
            admin_token: cli.admin_token.or(file.admin_token),
            jwt_secret: cli.jwt_secret.or(file.jwt_secret),
            read_token: cli.read_token.or(file.read_token),
            auth_hook_url: cli.auth_hook_url.or(file.auth_hook_url),
            max_connections: pick!(max_connections, 16384),
            max_handshakes_per_address: pick!(max_handshakes_per_address, 256),
            auth: Default::default(),
            secrets_on_command_line: Vec::new(),
            hls_part_ms: pick!(hls_part_ms, 200),
            hls_segment_ms: pick!(hls_segment_ms, 2000),
            hls_segments: pick!(hls_segments, 10),
            hls_grace: Duration::from_millis(pick!(hls_grace_ms, 30_000)),
            log: pick!(log, "info".to_string()),
            streams: cli.streams.or(file.streams).unwrap_or_default(),
            pull: cli.pull.or(file.pull).unwrap_or_default(),
            listen: cli.listen.or(file.listen).unwrap_or_default(),
        };
        cfg.validate()?;
        let auth = crate::auth::Auth::new(
            cfg.jwt_secret.as_deref(),
            &cfg.streams,
            cfg.read_token.clone(),
            cfg.admin_token.clone(),
            cfg.auth_hook_url.as_deref(),
        )
        .map_err(|reason| ConfigError::Invalid {
            key: if reason.starts_with("auth_hook_url") {
                "auth_hook_url"
            } else {
                "jwt_secret"
            },
            reason,
        })?;
        Ok(Config { auth, ..cfg })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.rtmp_app.is_empty() || self.rtmp_app.contains('/') {
            return invalid("rtmp_app", "must be a non-empty name without '/'");
        }
        if self.max_backlog_bytes < 64 << 10 {
            return invalid("max_backlog_bytes", "must be at least 65536");
        }
        if self.max_connections == 0 || self.max_handshakes_per_address == 0 {
            return invalid(
                "max_connections, max_handshakes_per_address",
                "must be greater than 0",
            );
        }
        if self.max_lag.is_zero() {
            return invalid("max_lag_ms", "must be greater than 0");
        }
        if self.stall_timeout.is_zero() {
            return invalid("stall_timeout_ms", "must be greater than 0");
        }
        if self.rtmp_handshake_timeout.is_zero() || self.rtmp_idle_timeout.is_zero() {
            return invalid("rtmp_*_timeout_ms", "must be greater than 0");
        }
        if self.rtmp == self.http && self.http.port() != 0 {
            return invalid("http", "must differ from the rtmp address");
        }
        for o in &self.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) {
                return invalid(
                    "allowed_origins",
                    &format!("{o:?} is not an http(s) origin"),
                );
            }
        }
        if self
            .srt_passphrase
            .as_ref()
            .is_some_and(|p| !(10..=79).contains(&p.len()))
        {
            return invalid(
                "srt_passphrase",
                "must be 10 to 79 characters (SRT's bounds)",
            );
        }
        if !(20..=8000).contains(&self.srt_latency.as_millis()) {
            return invalid("srt_latency_ms", "must be between 20 and 8000");
        }
        for (key, secret) in
            SECRETS
                .into_iter()
                .take(3)
                .zip([&self.admin_token, &self.jwt_secret, &self.read_token])
        {
            if secret.as_ref().is_some_and(|t| t.len() < 16) {
                return invalid(key, "must be at least 16 characters");
            }
        }
        if !(50..=5000).contains(&self.hls_part_ms) {
            return invalid("hls_part_ms", "must be between 50 and 5000");
        }
        if self.hls_segment_ms < 2 * self.hls_part_ms || self.hls_segment_ms > 60_000 {
            return invalid(
                "hls_segment_ms",
                "must be at least two parts (2 × hls_part_ms) and at most 60000",
            );
        }
        if !(3..=1000).contains(&self.hls_segments) {
            return invalid("hls_segments", "must be between 3 and 1000");
        }
        let fps_ok = |f: Option<f64>| f.is_none_or(|f| f.is_finite() && f > 0.0 && f <= 1000.0);
        for p in &self.pull {
            if !crate::hub::valid_stream_name(&p.name) {
                return invalid(
                    "pull.name",
                    &format!("{:?} is not a valid stream name", p.name),
                );
            }
            if p.tcp_addr().is_none()
                && let Err(e) = crate::ingest::pull::check_url(&p.url)
            {
                return invalid("pull.url", &e.to_string());
            }
            if !fps_ok(p.fps) {
                return invalid("pull.fps", "must be between 0 and 1000");
            }
        }
        for l in &self.listen {
            if !crate::hub::valid_stream_name(&l.name) {
                return invalid(
                    "listen.name",
                    &format!("{:?} is not a valid stream name", l.name),
                );
            }
            if !fps_ok(l.fps) {
                return invalid("listen.fps", "must be between 0 and 1000");
            }
            let unspecified = std::net::IpAddr::from([0, 0, 0, 0]);
            for a in l.allow.iter().flatten() {
                if crate::auth::network_contains(a, unspecified).is_none() {
                    return invalid(
                        "listen.allow",
                        &format!("{a:?} is not an address or a network (ADDR/BITS)"),
                    );
                }
            }
        }
        for (name, s) in &self.streams {
            if name != "*" && !crate::hub::valid_stream_name(name) {
                return invalid("streams", &format!("{name:?} is not a valid stream name"));
            }
            if s.publish_key.as_ref().is_some_and(|k| k.len() < 8) {
                return invalid("streams.*.publish_key", "must be at least 8 characters");
            }
            if s.play == Some(PlayPolicy::Token)
                && self.jwt_secret.is_none()
                && self.auth_hook_url.is_none()
            {
                return invalid(
                    "streams.*.play",
                    "\"token\" needs jwt_secret (which signs play tokens) or auth_hook_url",
                );
            }
            if s.latency_ms.is_some_and(|ms| !(50..=30_000).contains(&ms)) {
                return invalid("streams.*.latency_ms", "must be between 50 and 30000");
            }
            if let Some(ladder) = &s.ladder
                && let Err(e) = resolve_ladder(ladder)
            {
                return invalid("streams.*.ladder", &e);
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(self.log_filter()) {
            return invalid("log", &e.to_string());
        }
        Ok(())
    }

    /// The subscriber's filter: `log`, with h264-reader silenced unless `log` names it. Its
    /// Annex B reader logs an error for every byte outside a NAL unit, so noise from any peer
    /// would otherwise write a log line per byte; onair reports bad input itself, once per
    /// connection.
    pub fn log_filter(&self) -> String {
        // Parsers that log every malformed input they meet, which the ingest counts and
        // reports itself: a broken publisher would flood the log. Named in `log`, they speak.
        let mut filter = self.log.trim().to_string();
        for quiet in ["h264_reader", "mpeg2ts_reader"] {
            if !filter.contains(quiet) {
                if !filter.is_empty() {
                    filter.push(',');
                }
                filter.push_str(quiet);
                filter.push_str("=off");
            }
        }
        filter
    }
}

impl PullSource {
    /// `HOST:PORT` of a `tcp://` URL.
    pub fn tcp_addr(&self) -> Option<&str> {
        let rest = self.url.strip_prefix("tcp://")?;
        let rest = rest.split(['?', '/']).next()?;
        rest.rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map(|_| rest)
    }
}

impl Config {
    /// The settings for stream `name`: its own table, else `[streams."*"]`, else defaults.
    pub fn stream_settings(&self, name: &str) -> StreamPolicy {
        let s = self.streams.get(name).or_else(|| self.streams.get("*"));
        StreamPolicy {
            sync: s.is_some_and(|s| s.sync),
            latency_ms: s
                .and_then(|s| s.latency_ms)
                .unwrap_or(DEFAULT_SYNC_LATENCY_MS),
            // Checked by `validate`: entries that do not resolve cannot be here.
            ladder: s
                .and_then(|s| s.ladder.as_ref())
                .map(|entries| entries.iter().filter_map(|e| e.resolve().ok()).collect()),
        }
    }
}

fn read_file(path: &PathBuf) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.clone(),
        source: Box::new(source),
    })
}

/// Rejects `ONAIR_*` variables that name no key: a typo must not silently fall back to a default.
fn check_env(names: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    let cmd = Settings::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env().and_then(|e| e.to_str()).map(str::to_string))
        .collect();
    for name in names {
        if name.starts_with("ONAIR_") && !known.contains(&name) {
            return Err(ConfigError::UnknownEnv(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_resolve_presets_and_tables_and_skip_what_the_source_cannot_feed() {
        let file: Settings = toml::from_str(
            "[streams.a]\nladder = [\"480p\", { name = \"tiny\", height = 144, video_kbps = 90, fps = 15 }]\n\
             [streams.off]\nladder = []\n",
        )
        .unwrap();
        let cfg = Config::resolve(Settings::default(), file).unwrap();
        let a = cfg.stream_settings("a").ladder.expect("configured");
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].height, a[0].video_kbps), (480, 1000));
        let planned = plan_ladder(Some(&a), 360);
        assert_eq!(
            planned.iter().map(|r| &r.name[..]).collect::<Vec<_>>(),
            ["tiny"]
        );
        assert_eq!(cfg.stream_settings("off").ladder, Some(vec![]));
        // Unset: the two presets below the source.
        let default = plan_ladder(cfg.stream_settings("other").ladder.as_deref(), 720);
        assert_eq!(
            default.iter().map(|r| &r.name[..]).collect::<Vec<_>>(),
            ["480p", "360p"]
        );
        assert!(plan_ladder(None, 240).is_empty());
        for bad in [
            "ladder = [\"999p\"]",
            "ladder = [{ name = \"x\", height = 241, video_kbps = 100 }]",
            "ladder = [{ name = \"source\", height = 240, video_kbps = 100 }]",
            "ladder = [\"240p\", \"240p\"]",
        ] {
            let file: Settings = toml::from_str(&format!("[streams.s]\n{bad}\n")).unwrap();
            assert!(Config::resolve(Settings::default(), file).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_checked_when_the_config_is_read() {
        let check = |toml: &str| {
            let file: Settings = toml::from_str(toml).unwrap();
            Config::resolve(Settings::default(), file).map(|c| c.auth.publish_is_open())
        };
        assert!(matches!(
            check("[streams.a]\nplay = \"token\"\n"),
            Err(ConfigError::Invalid {
                key: "streams.*.play",
                ..
            })
        ));
        assert!(matches!(
            check("[streams.a]\npublish_key = \"short\"\n"),
            Err(ConfigError::Invalid {
                key: "streams.*.publish_key",
                ..
            })
        ));
        assert!(matches!(
            check("jwt_secret = \"short\"\n"),
            Err(ConfigError::Invalid {
                key: "jwt_secret",
                ..
            })
        ));
        assert!(matches!(
            check("[[listen]]\nname = \"c\"\naddr = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/40\"]\n"),
            Err(ConfigError::Invalid {
                key: "listen.allow",
                ..
            })
        ));
        assert!(matches!(check(""), Ok(true)), "open by default");
        assert!(matches!(
            check("[streams.\"*\"]\npublish_key = \"long-enough-key\"\n"),
            Ok(false)
        ));
        let jwt = "jwt_secret = \"0123456789abcdef\"\n[streams.a]\nplay = \"token\"\n";
        assert!(matches!(check(jwt), Ok(false)));
    }

    #[test]
    fn the_parsers_logs_are_off_unless_asked_for() {
        let with = |log: &str| {
            let file: Settings = toml::from_str(&format!("log = {log:?}")).unwrap();
            Config::resolve(Settings::default(), file)
                .unwrap()
                .log_filter()
        };
        assert_eq!(with("info"), "info,h264_reader=off,mpeg2ts_reader=off");
        assert_eq!(
            with("debug,h264_reader=warn"),
            "debug,h264_reader=warn,mpeg2ts_reader=off"
        );
        assert_eq!(with(""), "h264_reader=off,mpeg2ts_reader=off");
    }

    #[test]
    fn defaults_and_precedence() {
        let cfg = Config::resolve(Settings::default(), Settings::default()).unwrap();
        assert_eq!(cfg.rtmp.to_string(), "0.0.0.0:1935");
        assert_eq!(cfg.http.to_string(), "0.0.0.0:8080");
        let file: Settings = toml::from_str("http = \"127.0.0.1:9000\"\nmax_lag_ms = 500").unwrap();
        let cli = Settings::try_parse_from(["onair", "--http", "127.0.0.1:9001"]).unwrap();
        let cfg = Config::resolve(cli, file).unwrap();
        assert_eq!(cfg.http.to_string(), "127.0.0.1:9001");
        assert_eq!(cfg.max_lag, Duration::from_millis(500));
    }

    #[test]
    fn per_stream_settings_fall_back_to_star_then_defaults() {
        let file: Settings = toml::from_str(
            "[streams.concert]\nsync = true\nlatency_ms = 800\n[streams.\"*\"]\nsync = false",
        )
        .unwrap();
        let cfg = Config::resolve(Settings::default(), file).unwrap();
        assert_eq!(
            cfg.stream_settings("concert"),
            StreamPolicy {
                sync: true,
                latency_ms: 800,
                ladder: None,
            }
        );
        assert!(!cfg.stream_settings("other").sync);
        let cfg = Config::resolve(Settings::default(), Settings::default()).unwrap();
        assert_eq!(cfg.stream_settings("x").latency_ms, DEFAULT_SYNC_LATENCY_MS);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Settings>("htp = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<Settings>("http = \"not an address\"").is_err());
        assert!(Settings::try_parse_from(["onair", "--rtmp", "nope"]).is_err());
        let file: Settings = toml::from_str("max_backlog_bytes = 1").unwrap();
        assert!(Config::resolve(Settings::default(), file).is_err());
        assert!(check_env(["ONAIR_HTTP".to_string(), "PATH".to_string()].into_iter()).is_ok());
        let file: Settings = toml::from_str("[streams.a]\nsyncc = true").unwrap_or_default();
        assert!(file.streams.is_none(), "unknown per-stream key refused");
        let file: Settings = toml::from_str("[streams.a]\nlatency_ms = 10").unwrap();
        assert!(Config::resolve(Settings::default(), file).is_err());
        assert!(matches!(
            check_env(["ONAIR_HTTTP".to_string()].into_iter()),
            Err(ConfigError::UnknownEnv(_))
        ));
    }
}
