//! The config parser: any text gives a config or one error with a
//! `file:line:col:` position; never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let source = preforkd::config::Source::File("fuzz.toml".into());
        if let Err(e) = preforkd::config::Config::parse(text, source) {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.toml:"), "no position: {msg}");
        }
    }
});
