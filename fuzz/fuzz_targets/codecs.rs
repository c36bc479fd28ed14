//! The codec configurations Enhanced RTMP carries besides avcC: hvcC (with its SPS), av1C (with
//! its sequence header OBU) and vpcC. Nothing may panic, and what parses must describe a
//! picture a decoder could take.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::{av1::Av1Info, hevc, hevc::HevcInfo, vp9::Vp9Info};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = HevcInfo::parse(data) {
        assert!(info.codec.starts_with("hvc1."));
        assert!(info.width > 0 && info.height > 0);
        assert!(matches!(info.length_size, 1 | 2 | 4));
    }
    let _ = hevc::sps_dimensions(data);
    if let Ok(info) = Av1Info::parse(data) {
        assert!(info.codec.starts_with("av01."));
        assert!(info.width > 0 && info.height > 0);
    }
    if let Ok(info) = Vp9Info::parse(data) {
        assert!(matches!(info.bit_depth, 8 | 10 | 12));
    }
});
