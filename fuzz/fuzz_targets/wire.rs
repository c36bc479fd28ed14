//! The wire protocol's decoder, both directions (one decoder takes every kind): never a panic,
//! and whatever decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onair_protocol::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let again = m.to_vec().expect("a decoded message encodes");
        assert_eq!(Message::decode(&again).as_ref(), Ok(&m));
    }
});
