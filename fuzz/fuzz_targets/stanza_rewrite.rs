//! Fuzz target: see `o2tr_proxy_fuzz::stanza_rewrite`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    o2tr_proxy_fuzz::stanza_rewrite(data);
});
