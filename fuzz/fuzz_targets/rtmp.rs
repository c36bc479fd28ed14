//! A publisher's bytes after the RTMP handshake: onair's chunk check, then rml_rtmp's session
//! on whatever the check lets through (accepting its connect and publish requests, as the
//! server does). Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_server::ingest::rtmp::chunks::ChunkCheck;
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};

fuzz_target!(|data: &[u8]| {
    let mut check = ChunkCheck::default();
    let Ok((mut session, _)) = ServerSession::new(ServerSessionConfig::new()) else {
        return;
    };
    // The first byte says how the rest is cut into reads.
    let step = (usize::from(data.first().copied().unwrap_or(0)) + 1) * 16;
    for piece in data.get(1..).unwrap_or_default().chunks(step) {
        if check.push(piece).is_err() {
            return;
        }
        let Ok(results) = session.handle_input(piece) else {
            return;
        };
        for r in results {
            if let ServerSessionResult::RaisedEvent(
                ServerSessionEvent::ConnectionRequested { request_id, .. }
                | ServerSessionEvent::PublishStreamRequested { request_id, .. },
            ) = r
            {
                let _ = session.accept_request(request_id);
            }
        }
    }
});
