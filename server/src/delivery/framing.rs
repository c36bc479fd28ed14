//! Wire messages pre-framed as complete WebSocket frames: the hub's [`Framer`].
//!
//! Server-to-client frames are never masked, so a frame's bytes are the same for every viewer:
//! each message is framed once, here (when the hub logs it), and every viewer of a rendition
//! writes the same `Bytes`.

use bytes::Bytes;
use fastwebsockets::{Frame, Payload};
use onair_protocol::wire::{MEDIA_HEADER_LEN, MediaHeader, Message, WireError};

use crate::hub::Framer;

/// WebSocket framing for the hub's log.
pub struct WsFramer;

impl Framer for WsFramer {
    fn media(&self, header: &MediaHeader, payload: &[u8]) -> (Bytes, usize) {
        let framed = media(header, payload);
        let at = framed.len() - payload.len();
        (framed, at)
    }

    fn message(&self, msg: &Message<'_>) -> Result<Bytes, WireError> {
        message(msg)
    }
}

/// Largest WebSocket frame header for an unmasked frame (2 + 8 bytes of length).
const HEADROOM: usize = 10;

/// Frames a message whose body is written by `body` into the buffer after `HEADROOM` bytes.
fn frame_with(capacity: usize, body: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut buf = Vec::with_capacity(HEADROOM + capacity);
    buf.resize(HEADROOM, 0);
    body(&mut buf);
    let mut head = [0u8; 14];
    let n = Frame::binary(Payload::Borrowed(&buf[HEADROOM..])).fmt_head(&mut head);
    let start = HEADROOM - n;
    buf[start..HEADROOM].copy_from_slice(&head[..n]);
    Bytes::from(buf).slice(start..)
}

/// A wire message as one binary WebSocket frame.
pub fn message(msg: &Message<'_>) -> Result<Bytes, WireError> {
    let mut result = Ok(());
    let bytes = frame_with(64, |buf| result = msg.encode(buf));
    result.map(|()| bytes)
}

/// A media message as one binary WebSocket frame: the only copy of the payload the fan-out makes.
pub fn media(header: &MediaHeader, payload: &[u8]) -> Bytes {
    frame_with(MEDIA_HEADER_LEN + payload.len(), |buf| {
        let mut h = [0u8; MEDIA_HEADER_LEN];
        header.encode(&mut h);
        buf.extend_from_slice(&h);
        buf.extend_from_slice(payload);
    })
}

/// A close frame with a status code and a reason the client can show.
pub fn close(code: u16, reason: &str) -> Bytes {
    // RFC 6455 limits control frame payloads to 125 bytes: 2 for the code, 123 for the reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = Vec::new();
    Bytes::copy_from_slice(Frame::close(code, &reason.as_bytes()[..end]).write(&mut buf))
}

/// Any control frame fastwebsockets asks us to send (pong, close echo), serialized.
pub fn control(mut frame: Frame<'_>) -> Bytes {
    let mut buf = Vec::new();
    Bytes::copy_from_slice(frame.write(&mut buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use onair_protocol::wire::{Status, StatusCode};

    fn unframe(b: &[u8]) -> &[u8] {
        assert_eq!(b[0], 0x82, "FIN + binary");
        match b[1] {
            126 => &b[4..],
            127 => &b[10..],
            n => {
                assert_eq!(n as usize, b.len() - 2);
                &b[2..]
            }
        }
    }

    #[test]
    fn frames_every_length_class() {
        for len in [0usize, 100, 125, 126, 1000, 65535, 65536, 200_000] {
            let payload = vec![7u8; len];
            let h = MediaHeader {
                track: 0,
                keyframe: true,
                dts: 1,
                cts: 0,
                ingest_us: 2,
            };
            let f = media(&h, &payload);
            let body = unframe(&f);
            assert_eq!(body.len(), MEDIA_HEADER_LEN + len);
            // What a player's receipt counts for this message.
            assert_eq!(f.len() as u64, onair_protocol::wire::framed_len(body.len()));
            match Message::decode(body).unwrap() {
                Message::Media { header, payload: p } => {
                    assert_eq!(header, h);
                    assert_eq!(p, &payload[..]);
                }
                other => panic!("{other:?}"),
            }
        }
        let s = message(&Message::Status(Status {
            code: StatusCode::Waiting,
            message: "x",
        }))
        .unwrap();
        assert!(matches!(
            Message::decode(unframe(&s)),
            Ok(Message::Status(_))
        ));
    }

    #[test]
    fn the_framer_points_at_the_payload_in_the_frame() {
        for len in [3usize, 200, 70_000] {
            let payload = vec![9u8; len];
            let h = MediaHeader {
                track: 1,
                keyframe: true,
                dts: 7,
                cts: 0,
                ingest_us: 0,
            };
            let (framed, at) = WsFramer.media(&h, &payload);
            assert_eq!(&framed[at..], &payload[..]);
            assert_eq!(framed, media(&h, &payload));
        }
    }

    #[test]
    fn close_reason_is_cut_to_fit_a_control_frame() {
        let f = close(1001, &"é".repeat(100));
        assert!(f.len() <= 127);
        assert_eq!(f[0], 0x88);
    }
}
