//! FLV: video and audio tag bodies (Enhanced RTMP's ex-header, ModEx and multitrack messages
//! of both included), and the tag stream reader a TCP source's bytes go through, fed in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::flv::{AudioTag, TagReader, VideoTag, parse_audio, parse_video};

/// A video tag, and every track of a multitrack one: no track's body reaches past the tag.
fn video(body: &[u8]) {
    if let Ok(VideoTag::Multitrack(m)) = parse_video(body) {
        for track in m.tracks().take(body.len() + 1) {
            if let Ok((
                _,
                VideoTag::Frame { data, .. } | VideoTag::SequenceHeader { config: data, .. },
            )) = track
            {
                assert!(data.len() <= body.len());
            }
        }
    }
}

/// An audio tag, and every track of a multitrack one, likewise.
fn audio(body: &[u8]) {
    if let Ok(AudioTag::Multitrack(m)) = parse_audio(body) {
        for track in m.tracks().take(body.len() + 1) {
            if let Ok((
                _,
                AudioTag::Frame { data, .. } | AudioTag::SequenceHeader { config: data, .. },
            )) = track
            {
                assert!(data.len() <= body.len());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    video(data);
    audio(data);
    let mut reader = TagReader::default();
    // The first byte says how the rest is cut into pushes.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(step) {
        reader.push(chunk);
        while let Ok(Some(tag)) = reader.next_tag() {
            match tag.kind {
                8 => audio(&tag.body),
                9 => video(&tag.body),
                _ => {}
            }
        }
    }
});
