//! H.264 configuration: an avcC record, an SPS, and AVCC NAL unit framing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::avc::{AvcInfo, nal_units, parse_sps};

fuzz_target!(|data: &[u8]| {
    let _ = AvcInfo::parse(data);
    let _ = parse_sps(data);
    for length_size in 1..=4 {
        for nal in nal_units(data, length_size) {
            let _ = nal;
        }
    }
});
