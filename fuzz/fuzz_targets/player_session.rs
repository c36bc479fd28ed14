//! The player's protocol session: a sequence of server messages (each behind a u16 length)
//! into MSE configurations and fMP4 fragments. Never a panic, whatever the server sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_player::session::Session;

fuzz_target!(|data: &[u8]| {
    let mut session = Session::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let end = (2 + len).min(rest.len());
        let _ = session.message(&rest[2..end]);
        rest = &rest[end..];
    }
});
