//! Prometheus metrics at `/metrics`, through the `metrics` facade and
//! `metrics-exporter-prometheus` (without its default features: no HTTP listener of its own, no
//! push gateway, no C build; we render into our own route).
//!
//! Counters touched per frame or per write are cached handles ([`METRICS`]), registered once:
//! incrementing one is an atomic add, with no label lookup. Gauges that describe the hub (streams,
//! viewers) are read from the hub when scraped, so they always agree with `/api/streams`.

use std::sync::LazyLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::hub::{Events, Hub, SwitchReason};
use crate::transcode::Transcoders;

/// Why a viewer left, as the `reason` label of `onair_viewer_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    ClientClosed,
    ClientGone,
    Stalled,
    Protocol,
    Refused,
    Kicked,
    Shutdown,
    WriteError,
}

impl DisconnectReason {
    const ALL: [DisconnectReason; 8] = [
        Self::ClientClosed,
        Self::ClientGone,
        Self::Stalled,
        Self::Protocol,
        Self::Refused,
        Self::Kicked,
        Self::Shutdown,
        Self::WriteError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientGone => "client_gone",
            Self::Stalled => "stalled",
            Self::Protocol => "protocol_error",
            Self::Refused => "refused",
            Self::Kicked => "removed_by_operator",
            Self::Shutdown => "shutdown",
            Self::WriteError => "write_error",
        }
    }
}

pub struct Metrics {
    pub bytes_in: Counter,
    pub frames_in: Counter,
    pub bytes_out: Counter,
    pub keyframe_skips: Counter,
    pub viewers_joined: Counter,
    pub viewer_reports: Counter,
    /// Glass-to-glass latency from viewer reports, in seconds.
    pub viewer_latency: Histogram,
    /// Addresses the automatic choice forgot early to stay within its bound.
    pub abr_memory_evictions: Counter,
    disconnects: [Counter; DisconnectReason::ALL.len()],
}

impl Metrics {
    fn register() -> Self {
        Self {
            bytes_in: metrics::counter!("onair_ingest_bytes_total"),
            frames_in: metrics::counter!("onair_ingest_frames_total"),
            bytes_out: metrics::counter!("onair_viewer_bytes_sent_total"),
            keyframe_skips: metrics::counter!("onair_viewer_keyframe_skips_total"),
            viewers_joined: metrics::counter!("onair_viewer_connections_total"),
            viewer_reports: metrics::counter!("onair_viewer_reports_total"),
            viewer_latency: metrics::histogram!("onair_viewer_latency_seconds"),
            abr_memory_evictions: metrics::counter!("onair_abr_memory_evictions_total"),
            disconnects: DisconnectReason::ALL.map(
                |r| metrics::counter!("onair_viewer_disconnects_total", "reason" => r.label()),
            ),
        }
    }

    pub fn disconnect(&self, reason: DisconnectReason) {
        self.disconnects[reason as usize].increment(1);
    }
}

/// The hub's events, counted.
pub struct HubMetrics;

impl Events for HubMetrics {
    fn viewer_joined(&self) {
        METRICS.viewers_joined.increment(1);
    }

    fn media_in(&self, bytes: usize) {
        METRICS.frames_in.increment(1);
        METRICS.bytes_in.increment(bytes as u64);
    }

    fn viewer_report(&self, latency_ms: Option<u32>) {
        METRICS.viewer_reports.increment(1);
        if let Some(ms) = latency_ms {
            METRICS.viewer_latency.record(f64::from(ms) / 1000.0);
        }
    }

    fn keyframe_skip(&self) {
        METRICS.keyframe_skips.increment(1);
    }

    fn bytes_out(&self, bytes: u64) {
        METRICS.bytes_out.increment(bytes);
    }

    fn switch(&self, up: bool, reason: SwitchReason) {
        SWITCHES[usize::from(up)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Cold path (a switch is rare): the labelled lookup is fine.
        metrics::counter!(
            "onair_rendition_switches_total",
            "direction" => if up { "up" } else { "down" },
            "reason" => reason.name()
        )
        .increment(1);
    }
}

/// Rendition switches so far, down and up: what the dashboard's chart differentiates.
static SWITCHES: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// Rendition switches since the start: (down, up).
pub fn switch_totals() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (SWITCHES[0].load(Relaxed), SWITCHES[1].load(Relaxed))
}

/// The process's metric handles. Touch it only after [`install`]: handles made before a recorder
/// is installed go nowhere.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::register);

/// Counts an ingest failure (cold path: a labelled lookup is fine here).
pub fn ingest_error(protocol: &'static str, kind: &'static str) {
    metrics::counter!("onair_ingest_errors_total", "protocol" => protocol, "kind" => kind)
        .increment(1);
}

/// A multitrack packet of a track beside the default one, left out (`kind`: video or audio).
pub fn track_left_out(kind: &'static str) {
    metrics::counter!("onair_ingest_tracks_left_out_total", "kind" => kind).increment(1);
}

/// The process's open-file limit, set once at start-up: every socket takes one.
pub fn open_files_limit(n: u64) {
    metrics::gauge!("onair_open_files_limit").set(n as f64);
}

/// A connection closed at accept by a limit (cold path).
pub fn connection_refused(listener: &'static str, reason: &'static str) {
    metrics::counter!(
        "onair_connections_refused_total",
        "listener" => listener,
        "reason" => reason
    )
    .increment(1);
}

/// A request refused because a limit on what is held was reached (cold path).
pub fn limit_refused(limit: &'static str) {
    metrics::counter!("onair_limit_refusals_total", "limit" => limit).increment(1);
}

/// Credentials refused (cold path). `action` is publish, play, read or admin.
pub fn auth_refusal(action: &'static str, protocol: &'static str, reason: &'static str) {
    metrics::counter!(
        "onair_auth_refusals_total",
        "action" => action,
        "protocol" => protocol,
        "reason" => reason
    )
    .increment(1);
}

/// The ladder's ffmpeg restarted after a failure.
pub fn ladder_restart() {
    metrics::counter!("onair_transcoder_restarts_total").increment(1);
}

/// A ladder rung was dropped for not keeping real time.
pub fn ladder_rung_dropped(rung: &str) {
    let rung = crate::config::PRESETS
        .iter()
        .find(|p| p.0 == rung)
        .map_or("custom", |p| p.0);
    metrics::counter!("onair_transcoder_rungs_dropped_total", "rung" => rung).increment(1);
}

/// Latency buckets in seconds: fine around the 100 ms–1 s where onair lives.
const LATENCY_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0,
];

/// Installs the global recorder; returns the handle `/metrics` renders with.
pub fn install() -> Result<PrometheusHandle, String> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("onair_viewer_latency_seconds".into()),
            &LATENCY_BUCKETS,
        )
        .map_err(|e| format!("metrics: {e}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| format!("metrics: {e}"))?;
    describe();
    LazyLock::force(&METRICS);
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "onair_streams",
        "Streams known to the hub (live or with waiting viewers)"
    );
    describe_gauge!("onair_streams_live", "Streams with a publisher");
    describe_counter!(
        "onair_connections_refused_total",
        "Connections closed at accept, by listener and limit (max_connections, max_handshakes_per_address)"
    );
    describe_gauge!(
        "onair_connections_open",
        "Connections held, every listener together"
    );
    describe_gauge!(
        "onair_connections_in_handshake",
        "Connections that have not finished their handshake"
    );
    describe_gauge!("onair_connections_max", "max_connections");
    describe_counter!(
        "onair_limit_refusals_total",
        "Requests refused at a limit: hls_held (blocking playlist requests), feed_subscribers"
    );
    describe_gauge!(
        "onair_open_files_limit",
        "The process's open-file limit (RLIMIT_NOFILE): every connection takes one"
    );
    describe_gauge!("onair_viewers", "Connected WebSocket viewers");
    describe_counter!(
        "onair_ingest_bytes_total",
        Unit::Bytes,
        "Media payload bytes received from publishers"
    );
    describe_counter!("onair_ingest_frames_total", "Media frames received");
    describe_counter!(
        "onair_ingest_tracks_left_out_total",
        "Enhanced RTMP multitrack packets not carried (audio tracks beside the default one, video tracks past the bound or before their sequence header), by kind (video, audio)"
    );
    describe_counter!(
        "onair_auth_refusals_total",
        "Credentials refused, by action (publish, play, read, admin), protocol and reason"
    );
    describe_counter!(
        "onair_ingest_errors_total",
        "Publisher connections that ended in an error, by protocol and kind"
    );
    describe_counter!(
        "onair_viewer_bytes_sent_total",
        Unit::Bytes,
        "Bytes written to viewers"
    );
    describe_counter!(
        "onair_viewer_keyframe_skips_total",
        "Times a viewer fell behind and skipped to the next keyframe"
    );
    describe_counter!(
        "onair_viewer_connections_total",
        "Viewer connections accepted"
    );
    describe_counter!(
        "onair_viewer_disconnects_total",
        "Viewer disconnections, by reason"
    );
    describe_counter!(
        "onair_viewer_reports_total",
        "Viewer stats reports received"
    );
    describe_counter!(
        "onair_transcoder_restarts_total",
        "Times a ladder's ffmpeg was restarted after it failed"
    );
    describe_counter!(
        "onair_transcoder_rungs_dropped_total",
        "Ladder rungs dropped for falling behind real time, by preset (or custom)"
    );
    describe_counter!(
        "onair_rendition_switches_total",
        "Viewers moved from one rendition to another, by direction and reason"
    );
    describe_histogram!(
        "onair_viewer_latency_seconds",
        Unit::Seconds,
        "Glass-to-glass latency reported by viewers (ingest to display)"
    );
}

/// Renders the exposition: the hub's gauges first, read now.
///
/// The per-stream series is written here by hand rather than registered: a registered labelled
/// series lives in the recorder for good, and anyone can make up stream names (a viewer of an
/// unknown name creates a waiting stream), so the registry would grow without bound. Written
/// from the hub at each scrape, a stream's series goes when the stream goes. Stream names are
/// a safe alphabet (`valid_stream_name`), so they need no escaping in a label.
pub fn render(
    handle: &PrometheusHandle,
    hub: &Hub,
    transcoders: &Transcoders,
    limits: &crate::limits::Limits,
) -> String {
    metrics::gauge!("onair_connections_open").set(limits.open() as f64);
    metrics::gauge!("onair_connections_in_handshake").set(limits.in_handshake() as f64);
    metrics::gauge!("onair_connections_max").set(limits.max() as f64);
    let summaries = hub.summaries();
    metrics::gauge!("onair_streams").set(summaries.len() as f64);
    metrics::gauge!("onair_streams_live").set(summaries.iter().filter(|s| s.live).count() as f64);
    metrics::gauge!("onair_viewers").set(summaries.iter().map(|s| s.viewers).sum::<u64>() as f64);
    let mut out = handle.render();
    out.push_str(
        "# HELP onair_stream_viewers Connected viewers per stream\n\
         # TYPE onair_stream_viewers gauge\n",
    );
    for s in &summaries {
        out.push_str(&format!(
            "onair_stream_viewers{{stream=\"{}\"}} {}\n",
            s.name, s.viewers
        ));
    }
    // Viewers per rendition, and the ladder's speed: written like the per-stream series.
    let mut per_rendition: std::collections::BTreeMap<(String, u8), u64> = Default::default();
    for v in hub.viewers() {
        let r = v.rendition.load(std::sync::atomic::Ordering::Relaxed);
        *per_rendition.entry((v.stream.clone(), r)).or_default() += 1;
    }
    out.push_str(
        "# HELP onair_rendition_viewers Connected viewers per rendition\n\
         # TYPE onair_rendition_viewers gauge\n",
    );
    for stream in hub.streams() {
        for r in stream.renditions() {
            let n = per_rendition
                .get(&(stream.name.clone(), r.id))
                .copied()
                .unwrap_or(0);
            out.push_str(&format!(
                "onair_rendition_viewers{{stream=\"{}\",rendition=\"{}\"}} {n}\n",
                stream.name,
                r.name()
            ));
        }
    }
    out.push_str(
        "# HELP onair_transcoder_speed The ladder ffmpeg's speed per stream (1 = real time)\n\
         # TYPE onair_transcoder_speed gauge\n",
    );
    for s in &summaries {
        if let Some(speed) = transcoders
            .state(&s.name)
            .filter(|t| t.running)
            .and_then(|t| t.speed)
        {
            out.push_str(&format!(
                "onair_transcoder_speed{{stream=\"{}\"}} {speed}\n",
                s.name
            ));
        }
    }
    out
}
