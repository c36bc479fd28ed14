//! onair's browser player, compiled to Wasm.
//!
//! - [`session`]: the protocol side, with no browser: server messages in, MSE source
//!   configurations and fMP4 fragments out (boxed with `onair_protocol::fmp4`, the muxer the
//!   LL-HLS packager shares), on one continuous timeline across republishes and reconnects.
//! - [`latency`]: the controller that holds the live latency at its target by nudging
//!   `playbackRate`.
//! - `web` (wasm32 only): WebSocket, MediaSource / ManagedMediaSource, the `<video>` element,
//!   and the `Player` class that JavaScript sees:
//!
//! ```js
//! import init, { Player } from '/player/onair.js';
//! await init();
//! const player = new Player(document.querySelector('video'), 'ws://HOST:8080/ws/STREAM', { latencyMs: 200 });
//! player.on('state', s => console.log(s));
//! ```

pub mod latency;
pub mod session;

#[cfg(target_arch = "wasm32")]
mod web;

/// `ws://h/ws/NAME?x` → `http://h/hls/NAME/index.m3u8`, keeping a `token=` parameter (a play
/// token goes to HLS too). (Byte-level on purpose: `str` pattern searching adds kilobytes to
/// the bundle.)
pub fn hls_url_for(ws_url: &str) -> String {
    let b = ws_url.as_bytes();
    let end = b.iter().position(|&c| c == b'?').unwrap_or(b.len());
    let mut out = String::new();
    let rest = if b.starts_with(b"wss://") {
        out.push_str("https://");
        6
    } else if b.starts_with(b"ws://") {
        out.push_str("http://");
        5
    } else {
        0
    };
    let path = &b[rest..end];
    match path.windows(4).rposition(|w| w == b"/ws/") {
        Some(i) => {
            out.push_str(ws_url.get(rest..rest + i).unwrap_or_default());
            out.push_str("/hls/");
            out.push_str(ws_url.get(rest + i + 4..end).unwrap_or_default());
            out.push_str("/index.m3u8");
        }
        None => out.push_str(ws_url.get(rest..end).unwrap_or_default()),
    }
    let query = ws_url.get(end + 1..).unwrap_or_default();
    if let Some(token) = query
        .split('&')
        .find(|kv| kv.as_bytes().starts_with(b"token="))
    {
        out.push('?');
        out.push_str(token);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hls_url_for;

    #[test]
    fn hls_url_sits_next_to_the_websocket() {
        assert_eq!(
            hls_url_for("ws://h:8080/ws/cam1"),
            "http://h:8080/hls/cam1/index.m3u8"
        );
        assert_eq!(
            hls_url_for("wss://h/base/ws/a.b?token=1"),
            "https://h/base/hls/a.b/index.m3u8?token=1"
        );
        assert_eq!(
            hls_url_for("ws://h/ws/a?rendition=480p&token=x%2By"),
            "http://h/hls/a/index.m3u8?token=x%2By"
        );
        assert_eq!(
            hls_url_for("ws://h/ws/a?rendition=480p"),
            "http://h/hls/a/index.m3u8"
        );
        assert_eq!(hls_url_for("ws://h/other"), "http://h/other");
    }
}
