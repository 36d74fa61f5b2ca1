//! Configuration parsing and validation (`Config::parse`), with every environment
//! variable set to one fixed secret (the egress proxy's variables to a proxy URL whose
//! password is that secret; `NO_PROXY` unset) and every secret file unreadable.
//!
//! Properties: no panic; an accepted configuration holds what validation promises (at
//! least one app, app and client ids unique, limits within their documented ranges);
//! and the secret never shows, neither in an error (which is logged at startup and by
//! `check-config`) nor in the configuration's `Debug`, unless the text itself holds it.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use receipt_gateway::config::{Config, SecretSource};

/// What every environment variable holds.
const SECRET: &str = "fuzz-Secret-7f3a9c";

struct FixedSecrets;

impl SecretSource for FixedSecrets {
    fn env(&self, name: &str) -> Option<String> {
        match name.to_ascii_uppercase().as_str() {
            "NO_PROXY" => None,
            "HTTPS_PROXY" | "HTTP_PROXY" => Some(format!("http://gateway:{SECRET}@egress.internal:3128")),
            _ => Some(SECRET.to_owned()),
        }
    }

    fn file(&self, _path: &Path) -> std::io::Result<String> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let leaks = |shown: &str| !text.contains(SECRET) && shown.contains(SECRET);
    match Config::parse(&text, &FixedSecrets) {
        Err(e) => assert!(!leaks(&e.to_string()), "the error shows the secret: {e}"),
        Ok(config) => {
            assert!(!leaks(&format!("{config:?}")), "the configuration's Debug shows the secret");
            valid(&config);
        }
    }
});

fn valid(config: &Config) {
    assert!(!config.apps.is_empty(), "a configuration without apps");
    let apps: HashSet<_> = config.apps.iter().map(|a| a.id).collect();
    assert_eq!(apps.len(), config.apps.len(), "an app configured twice");
    let clients: HashSet<_> = config.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(clients.len(), config.clients.len(), "a client configured twice");
    for client in &config.clients {
        assert!((1..=64).contains(&client.id.len()), "client id {:?}", client.id);
        assert!((1..=1000).contains(&client.weight.get()), "client weight {}", client.weight);
    }
    for app in &config.apps {
        assert!(!app.identifier.is_empty(), "an empty identifier");
        // The scheme is case-insensitive, and the endpoint is kept as written.
        let scheme = app.endpoint.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        assert!(matches!(scheme.as_deref(), Some("http" | "https")), "endpoint {}", app.endpoint);
        assert!(!app.endpoint.ends_with('/'), "endpoint {} ends in a slash", app.endpoint);
    }
    let s = &config.server;
    assert!((1..=100_000).contains(&s.max_request_seqs), "max_request_seqs {}", s.max_request_seqs);
    assert!((64..=64 << 20).contains(&s.max_body_bytes), "max_body_bytes {}", s.max_body_bytes);
    assert!((1..=1000).contains(&config.batch.max_seqs), "batch.max_seqs {}", config.batch.max_seqs);
    assert!(config.upstream.max_retries <= 10, "max_retries {}", config.upstream.max_retries);
    assert!(!config.cache.ttl.is_zero(), "a zero cache.ttl");
}
