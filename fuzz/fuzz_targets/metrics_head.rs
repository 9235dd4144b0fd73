//! The metrics endpoint's request-head parser: any bytes, complete or not,
//! give a method and target or an HTTP status to answer; never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let complete = preforkd::metrics::head_complete(data);
    match preforkd::metrics::parse_request(data, complete) {
        Ok((method, target)) => assert!(!method.is_empty() && target.starts_with('/')),
        Err(status) => assert!(matches!(status, 400 | 431)),
    }
});
