//! The control socket's request parser: any line parses or is refused,
//! and what parses goes back on the wire as the same request.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(r) = preforkd::control::Request::parse(&line) {
        assert_eq!(preforkd::control::Request::parse(&r.to_line()), Ok(r));
    }
});
