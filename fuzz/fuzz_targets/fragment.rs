//! Fuzz target: feed parsed fragments to a bounded Reassembler, and
//! fragment arbitrary text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    o2tr_proxy_fuzz::fragment(data);
});
