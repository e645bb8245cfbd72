//! The configuration loader (`tsunagi_config::parse`, what `load` and `config check` run
//! after reading the file): TOML text to a validated `Config`, or every problem with its
//! line. Never panics; the problems print.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match tsunagi_config::parse(text, Path::new("tsunagi.toml")) {
        Ok(config) => {
            assert!(config.validate().is_empty(), "a parsed config is valid");
            let _ = config.secret_files();
        }
        Err(problems) => {
            let _ = problems.to_string();
        }
    }
});
