//! Raw H.264 (Annex B) into access units, in pushes of any size, within the NAL and access
//! unit limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::codec::annexb::AccessUnits;

fuzz_target!(|data: &[u8]| {
    let mut units = AccessUnits::new(64 << 10, 256 << 10);
    let mut out = Vec::new();
    // The first byte says how the rest is cut into pushes (1 to 16 KiB).
    let step = (usize::from(data.first().copied().unwrap_or(0)) + 1) * 64;
    for chunk in data.chunks(step) {
        if units.push(chunk, &mut out).is_err() {
            return;
        }
        let _ = units.take_parameter_sets();
    }
    let _ = units.finish(&mut out);
    for au in &out {
        let avcc = au.to_avcc();
        assert_eq!(
            avcc.len(),
            au.nals.iter().map(|n| n.len() + 4).sum::<usize>()
        );
    }
});
