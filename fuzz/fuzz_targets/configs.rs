//! cargo-fuzz target: `myha_fuzzing::configs` (what it covers is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    myha_fuzzing::configs(data);
});
