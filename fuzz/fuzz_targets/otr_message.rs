//! Fuzz target: parse and decode arbitrary text and bytes as OTR messages.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    o2tr_proxy_fuzz::otr_message(data);
});
