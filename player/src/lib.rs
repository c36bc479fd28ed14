//! The onair player. For now only the protocol side exists: it checks that a message stream from
//! the server is in the order the player relies on. The Wasm/MSE side comes with the player issue.

use onair_protocol::wire::{Message, WireError};

/// What the player is waiting for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Hello,
    Init,
    Keyframe,
    Playing,
}

/// Tracks the phase of a connection: hello, then init, then media from a keyframe.
#[derive(Debug, Default)]
pub struct Session {
    pub phase: Phase,
}

impl Session {
    pub fn on_message(&mut self, buf: &[u8]) -> Result<Phase, WireError> {
        match Message::decode(buf)? {
            Message::Hello(_) => self.phase = Phase::Init,
            Message::Init(_) => self.phase = Phase::Keyframe,
            Message::Media { header, .. } if self.phase == Phase::Keyframe && header.keyframe => {
                self.phase = Phase::Playing
            }
            _ => {}
        }
        Ok(self.phase)
    }
}
