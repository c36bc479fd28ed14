//! The browser side: WebSocket in, MediaSource out, and the `Player` class JavaScript sees.
//!
//! Everything runs on the page's one thread. State lives in `Inner` behind `Rc<RefCell<_>>`;
//! event handlers hold only a `Weak`, so dropping the `Player` ends it. Listener callbacks are
//! called after the borrow is released, so a listener may call back into the player.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use js_sys::{Function, Object, Reflect, Uint8Array};
use onair_protocol::wire::{
    MEDIA_HEADER_LEN, MediaHeader, Message, Receipt, StatusCode, TimeSyncRequest, TrackKind,
    ViewerStats, framed_len, kind,
};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{
    BinaryType, CloseEvent, Event, EventTarget, HtmlVideoElement, MediaSource,
    MediaSourceReadyState, MessageEvent, SourceBuffer, Url, WebSocket,
};

use crate::hls_url_for;
use crate::latency::{Controller, Decision};
use crate::session::{ClockSync, Event as SessionEvent, Session, SourceConfig};

#[wasm_bindgen]
extern "C" {
    /// iOS 17.1+ Safari has `ManagedMediaSource` and no `MediaSource`; web-sys has no binding.
    #[wasm_bindgen(extends = MediaSource, extends = EventTarget, js_name = ManagedMediaSource)]
    type ManagedMediaSource;

    #[wasm_bindgen(constructor, js_class = "ManagedMediaSource", catch)]
    fn new() -> Result<ManagedMediaSource, JsValue>;
}

/// Default target live latency: ~150 ms of buffer plus delivery and the decoder's own frame.
pub const DEFAULT_LATENCY_MS: f64 = 200.0;

/// Control ticks: often enough to react within a few frames.
const TICK_MS: i32 = 100;
/// How often the player tells the server what it has received (docs/protocol.md, receipt):
/// the server's automatic rendition choice reads the network's queue from it.
/// Time sync samples on connect, then one every `SYNC_EVERY_MS`.
const SYNC_SAMPLES: u32 = 5;
const SYNC_EVERY_MS: f64 = 10_000.0;
/// Media kept behind the playhead; older is removed so memory stays flat for hours.
const KEEP_BEHIND_S: f64 = 4.0;
const TRIM_BEYOND_S: f64 = 8.0;
/// Bytes waiting for a busy source buffer before the queue is dropped and playback resyncs at
/// the next keyframe (a hidden tab, a stuck decoder): memory stays bounded.
const MAX_QUEUED_BYTES: usize = 16 << 20;
/// A playhead that has not moved for this long while playing is stuck.
const STUCK_MS: f64 = 400.0;
/// Reconnect backoff.
const RECONNECT_MIN_MS: i32 = 500;
/// Close code of a viewer removed by the operator (docs/protocol.md): no reconnect.
const CLOSE_REMOVED: u16 = 4001;
const RECONNECT_MAX_MS: i32 = 5000;

fn now_us() -> u64 {
    match web_sys::window().and_then(|w| w.performance()) {
        Some(p) => ((p.time_origin() + p.now()) * 1000.0) as u64,
        None => (js_sys::Date::now() * 1000.0) as u64,
    }
}

fn log(msg: &str) {
    web_sys::console::log_1(&JsValue::from_str(msg));
}

fn log2(msg: &str, detail: &str) {
    web_sys::console::log_2(&JsValue::from_str(msg), &JsValue::from_str(detail));
}

/// A codec string of each video codec the server may send, to ask MSE about (the profile
/// most encoders use).
const CODEC_PROBES: [(&str, &str); 4] = [
    ("avc1", "avc1.42E01E"),
    ("hvc1", "hvc1.1.6.L93.B0"),
    ("av01", "av01.0.08M.08"),
    ("vp09", "vp09.00.10.08"),
];

/// The video codecs this browser's `MediaSource` (or `ManagedMediaSource`) plays in MP4, as
/// the server's `?codecs=` list: `avc1,av01`.
fn decodable_codecs(managed: bool) -> String {
    let class = if managed {
        "ManagedMediaSource"
    } else {
        "MediaSource"
    };
    let Ok(class) = Reflect::get(&js_sys::global(), &JsValue::from_str(class)) else {
        return String::new();
    };
    let Some(probe) = Reflect::get(&class, &JsValue::from_str("isTypeSupported"))
        .ok()
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
    else {
        return String::new();
    };
    CODEC_PROBES
        .iter()
        .filter(|(_, codec)| {
            let mime = JsValue::from_str(&format!("video/mp4; codecs=\"{codec}\""));
            probe
                .call1(&class, &mime)
                .is_ok_and(|v| v.as_bool() == Some(true))
        })
        .map(|(family, _)| *family)
        .collect::<Vec<_>>()
        .join(",")
}

fn has_global(name: &str) -> bool {
    Reflect::get(&js_sys::global(), &JsValue::from_str(name))
        .map(|v| !v.is_undefined())
        .unwrap_or(false)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    /// Connected, nobody is publishing.
    Waiting,
    Playing,
    Buffering,
    Reconnecting,
    /// The stream ended for good.
    Offline,
    /// No MSE: the `<video>` plays HLS by itself.
    Hls,
    Error,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Waiting => "waiting",
            State::Playing => "playing",
            State::Buffering => "buffering",
            State::Reconnecting => "reconnecting",
            State::Offline => "offline",
            State::Hls => "hls",
            State::Error => "error",
        }
    }

    /// The code in viewer stats (docs/protocol.md).
    fn code(self) -> u8 {
        match self {
            State::Playing | State::Hls => 1,
            State::Buffering => 2,
            State::Error => 4,
            _ => 0,
        }
    }
}

struct Source {
    kind: TrackKind,
    mime: String,
    /// The current init segment: put back in front when queued data has to be dropped.
    init: Vec<u8>,
    sb: Option<SourceBuffer>,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
}

/// A DOM listener we added and must remove.
struct Listener {
    target: EventTarget,
    event: &'static str,
    closure: Closure<dyn FnMut(Event)>,
}

/// Adds `f` as the `event` listener of `target`, remembered in `list` for [`unlisten`].
fn listen(
    list: &mut Vec<Listener>,
    target: &EventTarget,
    event: &'static str,
    f: impl FnMut(Event) + 'static,
) {
    let closure = Closure::<dyn FnMut(Event)>::new(f);
    let _ = target.add_event_listener_with_callback(event, closure.as_ref().unchecked_ref());
    list.push(Listener {
        target: target.clone(),
        event,
        closure,
    });
}

/// Removes every listener in `list` (and so frees their closures).
fn unlisten(list: &mut Vec<Listener>) {
    for l in list.drain(..) {
        let _ = l
            .target
            .remove_event_listener_with_callback(l.event, l.closure.as_ref().unchecked_ref());
    }
}

enum Out {
    State(State),
    Status(String),
    Stats,
}

struct Inner {
    video: HtmlVideoElement,
    url: String,
    session: Session,
    clock: ClockSync,
    ctl: Controller,
    /// The server's last word on this viewer (it answers each report).
    server_stats: Option<onair_protocol::wire::ServerStats>,
    ws: Option<WebSocket>,
    ws_handlers: Vec<Closure<dyn FnMut(JsValue)>>,
    media_source: Option<MediaSource>,
    object_url: Option<String>,
    managed: bool,
    sources: Vec<Source>,
    ms_listeners: Vec<Listener>,
    video_listeners: Vec<Listener>,
    tick: Option<(i32, Closure<dyn FnMut()>)>,
    reconnect: Option<(i32, Closure<dyn FnMut()>)>,
    reconnect_attempt: u32,
    state: State,
    live: bool,
    started: bool,
    /// A decode error poisoned the MediaSource: the next init builds a new one.
    force_new_source: bool,
    stalls: u32,
    gap_jumps: u32,
    /// Playhead at the last tick it moved, and when.
    last_time: f64,
    moved_ms: f64,
    viewer_id: u64,
    delivery_ms: f64,
    latency_ms: Option<f64>,
    buffer_ms: f64,
    bitrate_kbps: f64,
    bytes_mark: (u64, f64),
    last_stats_ms: f64,
    last_stall_report_ms: f64,
    last_trim_ms: f64,
    last_play_ms: f64,
    last_sync_ms: f64,
    sync_sent: u32,
    /// Bytes of every message of this connection as the server framed them, and when the
    /// last receipt went.
    ws_bytes: u64,
    last_receipt_ms: f64,
    /// How often the server asked for receipts; 0 until it asks (docs/protocol.md).
    receipt_every_ms: f64,
    listeners: Vec<(String, Function)>,
    outbox: Vec<Out>,
    destroyed: bool,
}

/// onair's player. `new Player(videoElement, 'ws://HOST:8080/ws/STREAM', { latencyMs: 200 })`.
#[wasm_bindgen]
pub struct Player {
    inner: Rc<RefCell<Inner>>,
}

/// Runs `f` on the player's state, then delivers the events it queued to the page's listeners,
/// with no borrow held. A callback arriving while the state is borrowed (it cannot, on one
/// thread, unless a listener re-enters) is dropped rather than panicking.
fn with(weak: &Weak<RefCell<Inner>>, f: impl FnOnce(&mut Inner, &Rc<RefCell<Inner>>)) {
    let Some(rc) = weak.upgrade() else { return };
    let (out, listeners, stats) = {
        let Ok(mut inner) = rc.try_borrow_mut() else {
            log("onair: event dropped: player busy (re-entered from a listener?)");
            return;
        };
        if inner.destroyed {
            return;
        }
        f(&mut inner, &rc);
        let out = std::mem::take(&mut inner.outbox);
        if out.is_empty() {
            return;
        }
        // Built only when a stats event is due: once a second, not on every state change.
        let stats = out
            .iter()
            .any(|o| matches!(o, Out::Stats))
            .then(|| inner.stats_object());
        (out, inner.listeners.clone(), stats)
    };
    for o in out {
        let (name, arg) = match o {
            Out::State(s) => ("state", JsValue::from_str(s.name())),
            Out::Status(m) => ("status", JsValue::from_str(&m)),
            Out::Stats => ("stats", stats.clone().map_or(JsValue::NULL, Into::into)),
        };
        for (n, cb) in &listeners {
            if n == name {
                let _ = cb.call1(&JsValue::NULL, &arg);
            }
        }
    }
}

#[wasm_bindgen]
impl Player {
    /// `options`: `{ latencyMs }`, the target live latency in milliseconds (default 200);
    /// `rendition`, a rendition's name to play (default `auto`: the server chooses), passed on
    /// as `?rendition=`; `codecs`, the video codecs to say this browser decodes (default: what
    /// `MediaSource.isTypeSupported` says, as `avc1,hvc1,av01,vp09` or a part of it), passed on
    /// as `?codecs=`; and `hlsUrl`, used where the browser has neither MediaSource nor
    /// ManagedMediaSource (default: the `/hls/STREAM/index.m3u8` next to the WebSocket URL).
    #[wasm_bindgen(constructor)]
    pub fn new(
        video: HtmlVideoElement,
        url: String,
        options: Option<Object>,
    ) -> Result<Player, JsValue> {
        let opt = |name: &str| {
            options
                .as_ref()
                .and_then(|o| Reflect::get(o, &JsValue::from_str(name)).ok())
                .filter(|v| !v.is_undefined() && !v.is_null())
        };
        let latency = opt("latencyMs")
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite() && *v > 0.0)
            .unwrap_or(DEFAULT_LATENCY_MS);
        let hls_url = opt("hlsUrl")
            .and_then(|v| v.as_string())
            .unwrap_or_else(|| hls_url_for(&url));
        let mut url = url;
        let mut param = |name: &str, value: &str| {
            let sep = if url.contains('?') { '&' } else { '?' };
            let value = String::from(js_sys::encode_uri_component(value));
            url = format!("{url}{sep}{name}={value}");
        };
        if let Some(r) = opt("rendition").and_then(|v| v.as_string())
            && r != "auto"
            && !r.is_empty()
        {
            param("rendition", &r);
        }
        let managed = !has_global("MediaSource") && has_global("ManagedMediaSource");
        // What this browser decodes goes to the server, which then sends no rendition outside
        // it (an HEVC source's H.264 rungs instead, say).
        let codecs = opt("codecs")
            .and_then(|v| v.as_string())
            .unwrap_or_else(|| decodable_codecs(managed));
        if !codecs.is_empty() {
            param("codecs", &codecs);
        }
        let inner = Rc::new(RefCell::new(Inner {
            video,
            url,
            session: Session::new(),
            clock: ClockSync::default(),
            ctl: Controller::new(latency),
            server_stats: None,
            ws: None,
            ws_handlers: Vec::new(),
            media_source: None,
            object_url: None,
            managed,
            sources: Vec::new(),
            ms_listeners: Vec::new(),
            video_listeners: Vec::new(),
            tick: None,
            reconnect: None,
            reconnect_attempt: 0,
            state: State::Connecting,
            live: false,
            started: false,
            force_new_source: false,
            stalls: 0,
            gap_jumps: 0,
            last_time: 0.0,
            moved_ms: 0.0,
            viewer_id: 0,
            delivery_ms: 0.0,
            latency_ms: None,
            buffer_ms: 0.0,
            bitrate_kbps: 0.0,
            bytes_mark: (0, 0.0),
            last_stats_ms: 0.0,
            last_stall_report_ms: 0.0,
            last_trim_ms: 0.0,
            last_play_ms: 0.0,
            last_sync_ms: 0.0,
            sync_sent: 0,
            ws_bytes: 0,
            last_receipt_ms: 0.0,
            receipt_every_ms: 0.0,
            listeners: Vec::new(),
            outbox: Vec::new(),
            destroyed: false,
        }));
        {
            let mut i = inner.borrow_mut();
            if !has_global("MediaSource") && !managed {
                // Older iPhones: the platform's own HLS player, fed by onair's LL-HLS.
                log2("onair: no MediaSource here, playing HLS from", &hls_url);
                i.video.set_src(&hls_url);
                let _ = i.video.play();
                i.state = State::Hls;
                return Ok(Player {
                    inner: inner.clone(),
                });
            }
            i.watch_video(&inner);
            i.start_tick(&inner);
            if let Err(e) = i.connect(&inner) {
                i.shutdown();
                return Err(e);
            }
        }
        Ok(Player { inner })
    }

    /// Adds a listener: `state` (a state name), `status` (the server's status message) or
    /// `stats` (the object `stats()` returns, once a second).
    pub fn on(&self, event: String, callback: Function) {
        if let Ok(mut i) = self.inner.try_borrow_mut() {
            i.listeners.push((event, callback));
        }
    }

    /// Stops playback and releases the connection, the MediaSource and every handler.
    pub fn destroy(&self) {
        if let Ok(mut i) = self.inner.try_borrow_mut() {
            i.shutdown();
        }
    }

    /// `connecting`, `waiting`, `playing`, `buffering`, `reconnecting`, `offline`, `hls` or
    /// `error`.
    #[wasm_bindgen(getter)]
    pub fn state(&self) -> String {
        self.read(|i| i.state.name().to_owned())
    }

    /// Live latency, ms: server ingest time of the frame on screen to now. NaN until known.
    #[wasm_bindgen(getter, js_name = latencyMs)]
    pub fn latency_ms(&self) -> f64 {
        self.read(|i| i.latency_ms.unwrap_or(f64::NAN))
    }

    #[wasm_bindgen(getter, js_name = targetLatencyMs)]
    pub fn target_latency_ms(&self) -> f64 {
        self.read(|i| i.ctl.target_ms())
    }

    #[wasm_bindgen(setter, js_name = targetLatencyMs)]
    pub fn set_target_latency_ms(&self, ms: f64) {
        if let Ok(mut i) = self.inner.try_borrow_mut()
            && ms.is_finite()
            && ms > 0.0
        {
            i.ctl.set_target_ms(ms);
        }
    }

    /// Media buffered ahead of the playhead, ms.
    #[wasm_bindgen(getter, js_name = bufferMs)]
    pub fn buffer_ms(&self) -> f64 {
        self.read(|i| i.buffer_ms)
    }

    #[wasm_bindgen(getter, js_name = droppedFrames)]
    pub fn dropped_frames(&self) -> u32 {
        self.read(|i| i.video.get_video_playback_quality().dropped_video_frames())
    }

    #[wasm_bindgen(getter, js_name = decodedFrames)]
    pub fn decoded_frames(&self) -> u32 {
        self.read(|i| i.video.get_video_playback_quality().total_video_frames())
    }

    /// Received bitrate over the last second, kbit/s.
    #[wasm_bindgen(getter, js_name = bitrateKbps)]
    pub fn bitrate_kbps(&self) -> f64 {
        self.read(|i| i.bitrate_kbps)
    }

    /// Everything above and more, as one object: what the page's overlay and tests read.
    pub fn stats(&self) -> Object {
        self.read(|i| i.stats_object())
    }

    /// Asks the server for rendition `id` (from `stats().rendition`'s numbering), or 255 for
    /// automatic. The switch happens at that rendition's next keyframe.
    #[wasm_bindgen(js_name = setRendition)]
    pub fn set_rendition(&self, id: u8) {
        self.read(|i| {
            i.send(&Message::Control(
                onair_protocol::wire::Control::SwitchRendition(id),
            ))
        });
    }
}

impl Player {
    fn read<T: Default>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        self.inner.try_borrow().map(|i| f(&i)).unwrap_or_default()
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        if let Ok(mut i) = self.inner.try_borrow_mut() {
            i.shutdown();
        }
    }
}

fn set_prop(o: &Object, k: &str, v: impl Into<JsValue>) {
    let _ = Reflect::set(o, &JsValue::from_str(k), &v.into());
}

impl Inner {
    fn set_state(&mut self, s: State) {
        if self.state != s {
            self.state = s;
            self.outbox.push(Out::State(s));
        }
    }

    fn stats_object(&self) -> Object {
        let o = Object::new();
        let q = self.video.get_video_playback_quality();
        set_prop(&o, "state", self.state.name());
        set_prop(&o, "latencyMs", self.latency_ms.unwrap_or(f64::NAN));
        set_prop(&o, "targetLatencyMs", self.ctl.target_ms());
        set_prop(&o, "bufferMs", self.buffer_ms);
        set_prop(&o, "deliveryMs", self.delivery_ms);
        set_prop(&o, "playbackRate", self.video.playback_rate());
        set_prop(&o, "decodedFrames", q.total_video_frames());
        set_prop(&o, "droppedFrames", q.dropped_video_frames());
        set_prop(&o, "bitrateKbps", self.bitrate_kbps);
        set_prop(&o, "stalls", self.stalls);
        set_prop(&o, "gapJumps", self.gap_jumps);
        set_prop(&o, "viewerId", self.viewer_id as f64);
        set_prop(&o, "rendition", self.session.rendition);
        set_prop(&o, "width", self.video.video_width());
        set_prop(&o, "height", self.video.video_height());
        set_prop(
            &o,
            "rttMs",
            self.clock.rtt_us().map_or(f64::NAN, |r| r as f64 / 1000.0),
        );
        set_prop(&o, "managedMediaSource", self.managed);
        set_prop(&o, "sync", self.ctl.synced());
        // The server ingest time of the playback position and the server's clock now, in ms:
        // what tests compare across viewers (synchronized playback).
        let t = self.video.current_time();
        if let Some(us) = self.session.position_ingest_us(t) {
            set_prop(&o, "ingestMs", us as f64 / 1000.0);
        }
        set_prop(
            &o,
            "serverNowMs",
            self.clock.server_time(now_us()) as f64 / 1000.0,
        );
        if let Some(s) = &self.server_stats {
            set_prop(&o, "serverBytesSent", s.bytes_sent as f64);
            set_prop(&o, "serverSendKbps", s.send_kbps);
            set_prop(&o, "serverBacklogBytes", s.backlog_bytes);
            set_prop(&o, "keyframeSkips", s.keyframe_skips);
        }
        o
    }

    // ---- connection ----

    fn connect(&mut self, rc: &Rc<RefCell<Inner>>) -> Result<(), JsValue> {
        self.set_state(if self.started {
            State::Reconnecting
        } else {
            State::Connecting
        });
        let ws = WebSocket::new(&self.url)?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        self.ws_bytes = 0;
        // A new connection sends receipts only once its server asks for them.
        self.receipt_every_ms = 0.0;
        let weak = Rc::downgrade(rc);
        let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
            with(&weak, |i, rc| {
                if let Ok(e) = e.dyn_into::<MessageEvent>() {
                    i.on_message(e.data(), rc);
                }
            })
        });
        let weak = Rc::downgrade(rc);
        let on_close = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
            with(&weak, |i, rc| {
                if let Ok(c) = e.dyn_into::<CloseEvent>() {
                    web_sys::console::log_3(
                        &"onair: connection closed".into(),
                        &c.code().into(),
                        &c.reason().into(),
                    );
                    if c.code() == CLOSE_REMOVED {
                        // The operator removed this viewer: coming back would defeat that.
                        i.close_ws();
                        i.set_state(State::Offline);
                        return;
                    }
                }
                i.schedule_reconnect(rc);
            })
        });
        let weak = Rc::downgrade(rc);
        let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_| {
            with(&weak, |i, _| {
                i.reconnect_attempt = 0;
                i.sync_sent = 0;
                i.clock = ClockSync::default();
                i.send_time_sync();
            })
        });
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        self.ws_handlers = vec![on_message, on_close, on_open];
        self.ws = Some(ws);
        Ok(())
    }

    fn close_ws(&mut self) {
        if let Some(ws) = self.ws.take() {
            ws.set_onmessage(None);
            ws.set_onclose(None);
            ws.set_onopen(None);
            let _ = ws.close();
        }
        self.ws_handlers.clear();
    }

    fn schedule_reconnect(&mut self, rc: &Rc<RefCell<Inner>>) {
        self.close_ws();
        if self.state == State::Offline || self.reconnect.is_some() {
            return;
        }
        self.set_state(State::Reconnecting);
        self.live = false;
        let delay = (RECONNECT_MIN_MS << self.reconnect_attempt.min(4)).min(RECONNECT_MAX_MS);
        self.reconnect_attempt += 1;
        let weak = Rc::downgrade(rc);
        let cb = Closure::<dyn FnMut()>::new(move || {
            with(&weak, |i, rc| {
                i.reconnect = None;
                if let Err(e) = i.connect(rc) {
                    web_sys::console::warn_2(&JsValue::from_str("onair: reconnect failed"), &e);
                    i.schedule_reconnect(rc);
                }
            })
        });
        if let Some(w) = web_sys::window()
            && let Ok(id) = w.set_timeout_with_callback_and_timeout_and_arguments_0(
                cb.as_ref().unchecked_ref(),
                delay,
            )
        {
            self.reconnect = Some((id, cb));
        }
    }

    fn send(&self, msg: &Message<'_>) {
        if let (Some(ws), Ok(buf)) = (&self.ws, msg.to_vec())
            && ws.ready_state() == WebSocket::OPEN
        {
            let _ = ws.send_with_u8_array(&buf);
        }
    }

    fn send_time_sync(&mut self) {
        self.sync_sent += 1;
        self.last_sync_ms = now_us() as f64 / 1000.0;
        self.send(&Message::TimeSyncRequest(TimeSyncRequest { t0: now_us() }));
    }

    fn on_message(&mut self, data: JsValue, rc: &Rc<RefCell<Inner>>) {
        let Ok(buf) = data.dyn_into::<js_sys::ArrayBuffer>() else {
            return;
        };
        let bytes = Uint8Array::new(&buf);
        let len = bytes.length() as usize;
        self.ws_bytes += framed_len(len);
        let result = if len >= MEDIA_HEADER_LEN && bytes.get_index(0) == kind::MEDIA {
            // Media: only the header is copied out; the payload goes from the browser's buffer
            // straight into its place in the fragment.
            let mut head = [0u8; MEDIA_HEADER_LEN];
            bytes
                .subarray(0, MEDIA_HEADER_LEN as u32)
                .copy_to(&mut head);
            match MediaHeader::decode(&head) {
                Ok(h) => self
                    .session
                    .media(&h, len - MEDIA_HEADER_LEN, |dst| {
                        bytes
                            .subarray(MEDIA_HEADER_LEN as u32, len as u32)
                            .copy_to(dst)
                    })
                    .map(|f| {
                        f.map(SessionEvent::Fragment)
                            .unwrap_or(SessionEvent::Ignored)
                    }),
                Err(e) => Err(e.into()),
            }
        } else {
            self.session.message(&bytes.to_vec())
        };
        match result {
            Ok(ev) => self.on_event(ev, rc),
            // The server speaks this protocol; anything else is a bug worth a visible log, not a
            // reason to stop playing.
            Err(e) => web_sys::console::warn_1(&JsValue::from_str(&format!("onair: {e}"))),
        }
    }

    fn on_event(&mut self, ev: SessionEvent, rc: &Rc<RefCell<Inner>>) {
        match ev {
            SessionEvent::Hello {
                viewer_id,
                server_time_us,
                ..
            } => {
                self.viewer_id = viewer_id;
                self.clock.hello(server_time_us, now_us());
            }
            SessionEvent::Status { code, message } => {
                match code {
                    StatusCode::Waiting => {
                        self.live = false;
                        self.set_state(State::Waiting);
                    }
                    StatusCode::Ended => {
                        self.live = false;
                        self.set_state(State::Offline);
                    }
                    StatusCode::Live | StatusCode::Republished => self.live = true,
                    StatusCode::Skipped => {}
                }
                self.outbox.push(Out::Status(message));
            }
            SessionEvent::Configure {
                sources,
                same_tracks,
            } => {
                self.live = true;
                self.configure(sources, same_tracks, rc);
            }
            SessionEvent::Fragment(f) => {
                let server_now = self.clock.server_time(now_us());
                let delivery_ms =
                    server_now.saturating_sub(self.session.last_ingest_us()) as f64 / 1000.0;
                // Frames from the GOP cache (a join, a reconnect) are old by design: they say
                // nothing about delivery.
                if delivery_ms < 1000.0 {
                    self.delivery_ms += 0.1 * (delivery_ms - self.delivery_ms);
                }
                if let Some(i) = self.sources.iter().position(|s| s.kind == f.kind) {
                    let s = &mut self.sources[i];
                    s.queued_bytes += f.data.len();
                    s.queue.push_back(f.data);
                    if s.queued_bytes > MAX_QUEUED_BYTES {
                        log("onair: source buffer is not keeping up; resyncing at a keyframe");
                        self.drop_queued();
                        return;
                    }
                    self.pump(i);
                }
            }
            SessionEvent::TimeSync(r) => {
                self.clock.add(&r, now_us());
                if self.sync_sent < SYNC_SAMPLES {
                    self.send_time_sync();
                }
            }
            SessionEvent::Sync(ms) => self.ctl.sync_to(f64::from(ms)),
            SessionEvent::Receipts(every_ms) => self.receipt_every_ms = f64::from(every_ms),
            SessionEvent::ServerStats(s) => self.server_stats = Some(s),
            SessionEvent::Ignored => {}
        }
    }

    // ---- MediaSource ----

    fn configure(&mut self, sources: Vec<SourceConfig>, same: bool, rc: &Rc<RefCell<Inner>>) {
        let reusable = same
            && !self.force_new_source
            && self.media_source.is_some()
            && self.sources.len() == sources.len();
        if reusable {
            for cfg in sources {
                let Some(i) = self.sources.iter().position(|s| s.kind == cfg.kind) else {
                    continue;
                };
                let s = &mut self.sources[i];
                if s.mime != cfg.mime {
                    // A new profile or level (another resolution): the buffer switches codec
                    // configuration in place, no new MediaSource, no black frame.
                    if let Some(sb) = &s.sb
                        && let Err(e) = sb.change_type(&cfg.mime)
                    {
                        web_sys::console::warn_2(&"onair: changeType".into(), &e);
                    }
                    s.mime = cfg.mime;
                }
                s.queued_bytes += cfg.init.len();
                s.queue.push_back(cfg.init.clone());
                s.init = cfg.init;
                self.pump(i);
            }
            return;
        }
        self.force_new_source = false;
        self.delivery_ms = 0.0;
        self.detach_media_source();
        let ms: MediaSource = if self.managed {
            match ManagedMediaSource::new() {
                Ok(m) => {
                    // Safari only streams into a ManagedMediaSource with AirPlay off (or an
                    // alternative source given).
                    let _ =
                        Reflect::set(&self.video, &"disableRemotePlayback".into(), &JsValue::TRUE);
                    m.unchecked_into()
                }
                Err(e) => return self.fail("ManagedMediaSource", &e),
            }
        } else {
            match MediaSource::new() {
                Ok(m) => m,
                Err(e) => return self.fail("MediaSource", &e),
            }
        };
        for cfg in &sources {
            // `MediaSource` itself does not exist where the managed one is used (iPhone).
            if !self.managed && !MediaSource::is_type_supported(&cfg.mime) {
                log2("onair: this browser cannot play", &cfg.mime);
            }
        }
        self.sources = sources
            .into_iter()
            .map(|cfg| Source {
                kind: cfg.kind,
                mime: cfg.mime,
                init: cfg.init.clone(),
                sb: None,
                queued_bytes: cfg.init.len(),
                queue: VecDeque::from([cfg.init]),
            })
            .collect();
        let weak = Rc::downgrade(rc);
        listen(&mut self.ms_listeners, &ms, "sourceopen", move |_| {
            with(&weak, |i, rc| i.on_source_open(rc))
        });
        let url = match Url::create_object_url_with_source(&ms) {
            Ok(u) => u,
            Err(e) => return self.fail("createObjectURL", &e),
        };
        self.video.set_src(&url);
        self.object_url = Some(url);
        self.media_source = Some(ms);
        self.started = false;
        self.ctl.reset();
    }

    fn on_source_open(&mut self, rc: &Rc<RefCell<Inner>>) {
        let Some(ms) = self.media_source.clone() else {
            return;
        };
        if ms.ready_state() != MediaSourceReadyState::Open {
            return;
        }
        if self.sources.iter().any(|s| s.sb.is_some()) {
            return;
        }
        for i in 0..self.sources.len() {
            let sb = match ms.add_source_buffer(&self.sources[i].mime) {
                Ok(sb) => sb,
                Err(e) => return self.fail("addSourceBuffer", &e),
            };
            let weak = Rc::downgrade(rc);
            listen(&mut self.ms_listeners, &sb, "updateend", move |_| {
                with(&weak, |inner, _| {
                    inner.pump(i);
                    inner.try_start();
                })
            });
            let weak = Rc::downgrade(rc);
            listen(&mut self.ms_listeners, &sb, "error", move |_| {
                with(&weak, |_, _| log("onair: source buffer append error"))
            });
            self.sources[i].sb = Some(sb);
        }
        for i in 0..self.sources.len() {
            self.pump(i);
        }
    }

    fn detach_media_source(&mut self) {
        unlisten(&mut self.ms_listeners);
        self.sources.clear();
        self.media_source = None;
        if let Some(url) = self.object_url.take() {
            let _ = Url::revoke_object_url(&url);
        }
    }

    /// Drops what waits to be appended and restarts at the next keyframe. The init segment goes
    /// back in front: what follows may be in a configuration the buffer has not seen yet.
    fn drop_queued(&mut self) {
        for s in &mut self.sources {
            s.queue.clear();
            s.queue.push_back(s.init.clone());
            s.queued_bytes = s.init.len();
        }
        self.session.resync();
    }

    /// Appends everything queued for source `i` in one go, if its buffer is idle.
    fn pump(&mut self, i: usize) {
        let Some(s) = self.sources.get_mut(i) else {
            return;
        };
        let Some(sb) = s.sb.clone() else { return };
        if sb.updating() || s.queue.is_empty() {
            return;
        }
        let mut data = if s.queue.len() == 1 {
            s.queue.pop_front().unwrap_or_default()
        } else {
            let mut all = Vec::with_capacity(s.queued_bytes);
            for d in s.queue.drain(..) {
                all.extend_from_slice(&d);
            }
            all
        };
        s.queued_bytes = 0;
        if let Err(e) = sb.append_buffer_with_u8_array(&mut data) {
            let name = Reflect::get(&e, &"name".into())
                .ok()
                .and_then(|n| n.as_string())
                .unwrap_or_default();
            if name == "QuotaExceededError" {
                // The browser's buffer is full: free what is behind the playhead and append
                // again after; with nothing to free, drop this data and restart at a keyframe.
                let t = self.video.current_time();
                let start = buffered_start(&sb);
                if let Some(start) = start.filter(|s| *s < t - 0.5) {
                    let _ = sb.remove(start, t - 0.5);
                    let s = &mut self.sources[i];
                    s.queued_bytes = data.len();
                    s.queue.push_front(data);
                } else {
                    log("onair: buffer full with nothing to free; resyncing at a keyframe");
                    self.drop_queued();
                }
            } else {
                web_sys::console::warn_2(&"onair: appendBuffer failed".into(), &e);
                self.drop_queued();
            }
        }
    }

    /// Starts playback once there is something buffered: jumps from the start of the cached GOP
    /// to the live edge minus the target, so the first frame shown is already live.
    fn try_start(&mut self) {
        if self.started {
            return;
        }
        let b = self.video.buffered();
        let n = b.length();
        if n == 0 {
            return;
        }
        let (Ok(start), Ok(end)) = (b.start(n - 1), b.end(n - 1)) else {
            return;
        };
        let behind = self.ctl.start_behind_end_s(self.delivery_ms);
        // Wait until there is a target's worth to stand on.
        if end - start < behind {
            return;
        }
        self.started = true;
        self.video.set_current_time((end - behind).max(start));
        self.ctl.reset();
        let _ = self.video.play();
    }

    /// A MediaSource step failed: start over with a new MediaSource on a new connection (the
    /// socket's close handler schedules the reconnect, with backoff).
    fn fail(&mut self, what: &str, e: &JsValue) {
        web_sys::console::error_3(&"onair: failed:".into(), &what.into(), e);
        self.set_state(State::Error);
        self.force_new_source = true;
        self.detach_media_source();
        if let Some(ws) = &self.ws {
            let _ = ws.close();
        }
    }

    // ---- the <video> element ----

    fn watch_video(&mut self, rc: &Rc<RefCell<Inner>>) {
        let target: EventTarget = self.video.clone().unchecked_into();
        let list = &mut self.video_listeners;
        let weak = Rc::downgrade(rc);
        listen(list, &target, "waiting", move |_| {
            with(&weak, |i, _| {
                // A stall is playback stopping once it ran; the wait for the first frame is
                // not one.
                if matches!(i.state, State::Playing) && i.live {
                    i.stalls += 1;
                    i.set_state(State::Buffering);
                    // The server's rendition choice acts on stalls: tell it now rather than at
                    // the next report, but at most twice a second (its message budget is 20).
                    let now_ms = now_us() as f64 / 1000.0;
                    if now_ms - i.last_stall_report_ms >= 500.0 {
                        i.last_stall_report_ms = now_ms;
                        i.report();
                    }
                }
            })
        });
        let weak = Rc::downgrade(rc);
        listen(list, &target, "playing", move |_| {
            with(&weak, |i, _| i.set_state(State::Playing))
        });
        let weak = Rc::downgrade(rc);
        listen(list, &target, "error", move |_| {
            with(&weak, |i, rc| {
                if let Some(e) = i.video.error() {
                    web_sys::console::log_3(
                        &"onair: media error; starting over:".into(),
                        &e.code().into(),
                        &e.message().into(),
                    );
                }
                // The element's decoder is gone: a new MediaSource on a fresh connection,
                // which starts again from a keyframe.
                i.force_new_source = true;
                i.detach_media_source();
                i.schedule_reconnect(rc);
            })
        });
    }

    fn start_tick(&mut self, rc: &Rc<RefCell<Inner>>) {
        let weak = Rc::downgrade(rc);
        let cb = Closure::<dyn FnMut()>::new(move || with(&weak, |i, _| i.tick()));
        if let Some(w) = web_sys::window()
            && let Ok(id) = w.set_interval_with_callback_and_timeout_and_arguments_0(
                cb.as_ref().unchecked_ref(),
                TICK_MS,
            )
        {
            self.tick = Some((id, cb));
        }
    }

    /// The control loop: latency, gaps, trimming, stats.
    fn tick(&mut self) {
        let now_ms = now_us() as f64 / 1000.0;
        if self.receipt_every_ms > 0.0 && now_ms - self.last_receipt_ms >= self.receipt_every_ms {
            self.last_receipt_ms = now_ms;
            self.send(&Message::Receipt(Receipt {
                bytes: self.ws_bytes,
            }));
        }
        if now_ms - self.last_stats_ms >= 1000.0 {
            let bytes = self.session.bytes_received();
            let (b0, t0) = self.bytes_mark;
            if t0 > 0.0 {
                self.bitrate_kbps = (bytes - b0) as f64 * 8.0 / (now_ms - t0);
            }
            self.bytes_mark = (bytes, now_ms);
            self.last_stats_ms = now_ms;
            self.report();
            self.outbox.push(Out::Stats);
        }
        if self.sync_sent >= SYNC_SAMPLES && now_ms - self.last_sync_ms > SYNC_EVERY_MS {
            self.send_time_sync();
        }
        if !self.started {
            self.try_start();
            return;
        }
        let t = self.video.current_time();
        let b = self.video.buffered();
        let mut buffer_s = 0.0;
        let mut end = None;
        let mut next_start = None;
        for k in 0..b.length() {
            let (Ok(s), Ok(e)) = (b.start(k), b.end(k)) else {
                continue;
            };
            end = Some(e);
            if s <= t + 0.001 && t < e {
                buffer_s = e - t;
            } else if s > t && next_start.is_none() {
                next_start = Some(s);
            }
        }
        self.buffer_ms = buffer_s * 1000.0;
        // The element's own events miss cases (a decoder that never resumes from underflow
        // fires no 'playing'), so the state also follows whether the playhead moves.
        if (t - self.last_time).abs() > 1e-4 || self.video.paused() {
            self.last_time = t;
            self.moved_ms = now_ms;
            if self.live && !self.video.paused() {
                self.set_state(State::Playing);
            }
        } else if now_ms - self.moved_ms > STUCK_MS {
            if self.live {
                self.set_state(State::Buffering);
            }
            // Data continues further on (after a republish seam, a resync, a reconnect) but the
            // decoder will not cross the hole, or will not restart from the little it has
            // before it: move to where the data continues.
            if let Some(s) = next_start.filter(|s| *s - t < 60.0) {
                self.jump_to(s);
            }
            self.moved_ms = now_ms;
        }
        if buffer_s == 0.0 {
            // Stalled at a hole (a frame lost to a resync, a republish seam): jump it.
            if let Some(s) = next_start.filter(|s| *s - t < 5.0) {
                self.jump_to(s);
            }
            self.latency_ms = None;
            return;
        }
        let server_now = self.clock.server_time(now_us());
        let measured = self
            .session
            .position_ingest_us(t)
            .map(|ingest| server_now.saturating_sub(ingest) as f64 / 1000.0);
        // A new MediaSource, or the page, may have reset the element's rate.
        self.ctl.observe_rate(self.video.playback_rate());
        match self.ctl.update(measured, self.buffer_ms, self.delivery_ms) {
            Decision::Keep => {}
            Decision::Rate(r) => self.video.set_playback_rate(r),
            Decision::Seek { behind_end_s } => {
                if let Some(e) = end {
                    log("onair: far behind live; seeking to the live edge");
                    self.video.set_current_time(e - behind_end_s);
                }
            }
        }
        self.latency_ms = self.ctl.latency_ms();
        // Autoplay can be refused (no user gesture, iOS Low Power Mode): ask again once a
        // second, not every tick; the page offers a play button meanwhile.
        if self.video.paused() && self.live && now_ms - self.last_play_ms > 1000.0 {
            self.last_play_ms = now_ms;
            let _ = self.video.play();
        }
        if now_ms - self.last_trim_ms > 1000.0 {
            self.last_trim_ms = now_ms;
            for s in &self.sources {
                if let Some(sb) = &s.sb
                    && let Some(start) = buffered_start(sb)
                    && !sb.updating()
                    && t - start > TRIM_BEYOND_S
                {
                    let _ = sb.remove(start, t - KEEP_BEHIND_S);
                }
            }
        }
    }

    /// Moves the playhead over a hole to where buffered data starts again.
    fn jump_to(&mut self, start: f64) {
        self.gap_jumps += 1;
        self.video.set_current_time(start + 0.001);
        self.ctl.reset();
    }

    /// Viewer stats to the server, once a second (docs/protocol.md).
    fn report(&self) {
        let q = self.video.get_video_playback_quality();
        self.send(&Message::ViewerStats(ViewerStats {
            latency_ms: self.latency_ms.unwrap_or(0.0).max(0.0) as u32,
            buffer_ms: self.buffer_ms.max(0.0) as u32,
            decoded_frames: q.total_video_frames(),
            dropped_frames: q.dropped_video_frames(),
            stalls: self.stalls,
            bandwidth_kbps: self.bitrate_kbps.max(0.0) as u32,
            rendition: self.session.rendition,
            // A viewer who paused is not playing live: its growing latency is its choice.
            state: if self.state == State::Playing && self.video.paused() {
                3
            } else {
                self.state.code()
            },
        }));
    }

    fn shutdown(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        self.close_ws();
        if let Some(w) = web_sys::window() {
            if let Some((id, _)) = self.tick.take() {
                w.clear_interval_with_handle(id);
            }
            if let Some((id, _)) = self.reconnect.take() {
                w.clear_timeout_with_handle(id);
            }
        }
        unlisten(&mut self.video_listeners);
        self.detach_media_source();
        self.video.remove_attribute("src").ok();
        self.video.load();
    }
}

fn buffered_start(sb: &SourceBuffer) -> Option<f64> {
    let b = sb.buffered().ok()?;
    if b.length() == 0 {
        return None;
    }
    b.start(0).ok()
}
