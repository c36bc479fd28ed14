//! FLV: video and audio tag bodies (Enhanced RTMP's ex-header included), and the tag stream
//! reader a TCP source's bytes go through, fed in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::flv::{TagReader, parse_audio, parse_video};

fuzz_target!(|data: &[u8]| {
    let _ = parse_video(data);
    let _ = parse_audio(data);
    let mut reader = TagReader::default();
    // The first byte says how the rest is cut into pushes.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(step) {
        reader.push(chunk);
        while let Ok(Some(tag)) = reader.next_tag() {
            match tag.kind {
                8 => drop(parse_audio(&tag.body)),
                9 => drop(parse_video(&tag.body)),
                _ => {}
            }
        }
    }
});
