//! Pushed CMAF (HTTP push ingest): an init segment (the first two bytes say how long it is),
//! then a media segment cut into reads at the next byte's value. Whatever parses must give
//! the same samples in any chunking, each inside its mdat, and nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::cmaf::{BoxSplitter, Fragments, Init, MAX_SAMPLES, Sample};

fn samples(init: &Init, media: &[u8], step: usize) -> (Vec<Sample>, bool) {
    let mut splitter = BoxSplitter::default();
    let mut fragments = Fragments::default();
    let mut out = Vec::new();
    for chunk in media.chunks(step.max(1)) {
        splitter.push(chunk);
        loop {
            match splitter.next_box() {
                Ok(Some((kind, data))) => {
                    let len = data.len();
                    let before = out.len();
                    if fragments.push_box(init, kind, data, &mut out).is_err() {
                        return (out, true);
                    }
                    assert!(out.len() - before <= MAX_SAMPLES);
                    assert!(out[before..].iter().all(|s| s.data.len() <= len));
                }
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let init_len = usize::from(u16::from_be_bytes([data[0], data[1]])).min(data.len() - 3);
    let step = usize::from(data[2]) + 1;
    let (init, media) = data[3..].split_at(init_len);
    let Ok(init) = Init::parse(init) else {
        return;
    };
    for t in &init.tracks {
        assert!(t.timescale > 0);
    }
    let (chunked, failed) = samples(&init, media, step);
    let (whole, failed_whole) = samples(&init, media, media.len());
    assert_eq!(failed, failed_whole, "the chunking changed the outcome");
    assert_eq!(chunked, whole, "the chunking changed the samples");
});
