//! Fuzz target: see `o2tr_proxy_fuzz::data_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    o2tr_proxy_fuzz::data_message(data);
});
