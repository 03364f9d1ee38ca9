//! The QEMU-style command line and keyval parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let args: Vec<&str> = s.split('\0').collect();
    let _ = moat_cli::parse_args(&args);
    let _ = moat_cli::keyval::parse("-x", &s, Some("type"));
    let _ = moat_cli::keyval::parse_size("-m", &s, 1 << 20);
});
