//! The way out to Tencent (docs/configuration.md#upstream): the egress proxy, from
//! `upstream.proxy` or the standard `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` variables,
//! and the extra PEM roots of `upstream.ca_file`.
//!
//! Resolved once, at start, through the same [`SecretSource`] as the secrets: the process
//! environment in production, a test's own values in tests (which run in one process and
//! must not set process variables). Proxy credentials are kept apart from the proxy's
//! URL, so that the URL can be logged and printed as it is.

use std::path::Path;

use base64::Engine as _;
use http::Uri;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::{ConfigError, SecretSource, invalid};
use crate::tencent::usersig::SecretKey;

/// Where upstream calls leave through, resolved.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    /// The proxy `https://` upstreams are reached through (`CONNECT`).
    pub https: Option<Proxy>,
    /// The proxy `http://` upstreams are reached through (also `CONNECT`).
    pub http: Option<Proxy>,
    /// `NO_PROXY`: hosts, domains (and their subdomains) and IP networks reached directly,
    /// by curl's rules.
    pub no_proxy: String,
    /// Where the proxy settings came from, for the start-up log and `check-config`.
    pub origin: ProxyOrigin,
}

/// Where [`Egress`] came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyOrigin {
    /// No proxy: every call goes straight out.
    #[default]
    None,
    /// `upstream.proxy`.
    Config,
    /// `HTTPS_PROXY` / `HTTP_PROXY`.
    Environment,
}

/// One HTTP proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// `http://host:port/`, never with credentials: safe to log.
    pub url: Uri,
    /// `Proxy-Authorization: Basic …` for the `CONNECT`, from the URL's `user:pass@` or
    /// `upstream.proxy_auth_env`.
    pub authorization: Option<SecretKey>,
}

impl Egress {
    /// What a log line or `check-config` may show: the proxies without credentials.
    pub fn describe(&self) -> String {
        let show = |p: &Option<Proxy>| match p {
            None => "direct".to_owned(),
            Some(p) if p.authorization.is_some() => format!("{} (with credentials)", p.url),
            Some(p) => p.url.to_string(),
        };
        let origin = match self.origin {
            ProxyOrigin::None => return "direct (no proxy configured)".into(),
            ProxyOrigin::Config => "upstream.proxy",
            ProxyOrigin::Environment => "environment",
        };
        let no = if self.no_proxy.is_empty() { String::new() } else { format!(", NO_PROXY={}", self.no_proxy) };
        format!("https via {}, http via {} (from {origin}{no})", show(&self.https), show(&self.http))
    }
}

/// The first of `names` set to something other than blanks.
fn first_env(secrets: &dyn SecretSource, names: [&str; 2]) -> Option<(String, String)> {
    names.into_iter().find_map(|n| secrets.env(n).filter(|v| !v.trim().is_empty()).map(|v| (n.to_owned(), v)))
}

/// Resolves the proxy settings: `proxy` (the file's `upstream.proxy`) wins over the
/// environment's `HTTPS_PROXY` / `HTTP_PROXY` (either case); `NO_PROXY` applies to both;
/// `proxy_auth_env` names the variable holding `user:password`, which replaces any
/// credentials in the URL.
pub(super) fn resolve(
    proxy: Option<&str>,
    proxy_auth_env: Option<&str>,
    secrets: &dyn SecretSource,
) -> Result<Egress, ConfigError> {
    let no_proxy = first_env(secrets, ["NO_PROXY", "no_proxy"]).map(|(_, v)| v.trim().to_owned()).unwrap_or_default();
    let mut egress = match proxy {
        Some(text) => {
            let proxy = parse_proxy("upstream.proxy", text)?;
            Egress { https: Some(proxy.clone()), http: Some(proxy), no_proxy, origin: ProxyOrigin::Config }
        }
        None => {
            let from_env = |names| match first_env(secrets, names) {
                None => Ok(None),
                Some((name, text)) => parse_proxy(&format!("{name} (environment)"), &text).map(Some),
            };
            let https = from_env(["HTTPS_PROXY", "https_proxy"])?;
            let http = from_env(["HTTP_PROXY", "http_proxy"])?;
            let origin = if https.is_some() || http.is_some() { ProxyOrigin::Environment } else { ProxyOrigin::None };
            Egress { https, http, no_proxy, origin }
        }
    };
    if let Some(var) = proxy_auth_env {
        let key = "upstream.proxy_auth_env";
        let value = secrets.env(var).ok_or_else(|| invalid(key, format!("environment variable {var} is not set")))?;
        let value = value.trim();
        if !value.contains(':') {
            return Err(invalid(key, format!("environment variable {var} must hold user:password")));
        }
        if egress.origin == ProxyOrigin::None {
            return Err(invalid(key, "is set but no proxy is (upstream.proxy, HTTPS_PROXY or HTTP_PROXY)"));
        }
        let authorization = basic(value);
        for p in [&mut egress.https, &mut egress.http].into_iter().flatten() {
            p.authorization = Some(authorization.clone());
        }
    }
    Ok(egress)
}

/// `Basic base64(user:password)`, the value of `Proxy-Authorization`.
fn basic(user_password: &str) -> SecretKey {
    SecretKey::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password)))
}

/// Accepts `[http://][user[:password]@]host[:port]` (percent-encoded credentials, as in
/// curl's variables) and splits the credentials off.
fn parse_proxy(key: &str, text: &str) -> Result<Proxy, ConfigError> {
    let text = text.trim();
    let rest = match text.split_once("://") {
        None => text,
        Some(("http" | "HTTP", rest)) => rest,
        Some((scheme, _)) => {
            return Err(invalid(key, format!("a {scheme}:// proxy is not supported: use http://host:port")));
        }
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#']) {
        return Err(invalid(key, "must be http://[user:password@]host:port"));
    }
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let url: Uri =
        format!("http://{host_port}/").parse().map_err(|_| invalid(key, "must be http://[user:password@]host:port"))?;
    if url.host().is_none_or(str::is_empty) {
        return Err(invalid(key, "has no host"));
    }
    let authorization = userinfo.map(|u| basic(&percent_decode(u)));
    Ok(Proxy { url, authorization })
}

/// Decodes `%XX` escapes; anything malformed stays as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the PEM roots of `upstream.ca_file`: at least one certificate, each one a trust
/// anchor rustls accepts.
pub(super) fn extra_roots(
    path: &Path,
    secrets: &dyn SecretSource,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let key = "upstream.ca_file";
    let text = secrets.file(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{} holds no PEM certificate", path.display())));
    }
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Env(HashMap<&'static str, &'static str>);

    impl SecretSource for Env {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
        fn file(&self, _: &Path) -> std::io::Result<String> {
            Err(std::io::ErrorKind::NotFound.into())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> Env {
        Env(pairs.iter().copied().collect())
    }

    #[test]
    fn the_environment_is_read_in_either_case_upper_first() {
        let e = resolve(None, None, &env(&[])).unwrap();
        assert!(e.https.is_none() && e.http.is_none() && e.origin == ProxyOrigin::None);

        let e = resolve(
            None,
            None,
            &env(&[
                ("https_proxy", "http://lower:3128"),
                ("HTTPS_PROXY", "http://upper:3128"),
                ("http_proxy", "plain:8080"),
                ("no_proxy", "localhost, .internal,10.0.0.0/8"),
            ]),
        )
        .unwrap();
        assert_eq!(e.origin, ProxyOrigin::Environment);
        assert_eq!(e.https.unwrap().url, "http://upper:3128/");
        assert_eq!(e.http.unwrap().url, "http://plain:8080/");
        assert_eq!(e.no_proxy, "localhost, .internal,10.0.0.0/8");
    }

    #[test]
    fn the_file_wins_and_credentials_never_reach_the_url() {
        let vars = env(&[("HTTPS_PROXY", "http://env:3128"), ("AUTH", "gw:s3cret"), ("NO_PROXY", "a.b")]);
        let e = resolve(Some("http://file.internal:3128"), None, &vars).unwrap();
        assert_eq!(e.origin, ProxyOrigin::Config);
        assert_eq!(e.https.as_ref().unwrap().url, "http://file.internal:3128/");
        assert_eq!(e.no_proxy, "a.b", "NO_PROXY applies to the file's proxy too");

        let e = resolve(Some("http://us%40r:p%3Ass@file.internal:3128"), None, &vars).unwrap();
        let proxy = e.https.clone().unwrap();
        assert_eq!(proxy.url, "http://file.internal:3128/");
        assert_eq!(proxy.authorization.unwrap().expose(), format!("Basic {}", base64_of("us@r:p:ss")));
        assert!(!e.describe().contains("p:ss") && !e.describe().contains(&base64_of("us@r:p:ss")), "{}", e.describe());

        let e = resolve(None, Some("AUTH"), &vars).unwrap();
        assert_eq!(e.https.unwrap().authorization.unwrap().expose(), format!("Basic {}", base64_of("gw:s3cret")));
    }

    fn base64_of(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn bad_proxies_are_errors_that_name_the_key() {
        let e = resolve(Some("socks5://x:1080"), None, &env(&[])).unwrap_err().to_string();
        assert!(e.starts_with("upstream.proxy:"), "{e}");
        let e = resolve(None, None, &env(&[("https_proxy", "http://x:1/path")])).unwrap_err().to_string();
        assert!(e.starts_with("https_proxy (environment):"), "{e}");
        let e = resolve(Some("http://x:1"), Some("MISSING"), &env(&[])).unwrap_err().to_string();
        assert!(e.starts_with("upstream.proxy_auth_env:"), "{e}");
        let e = resolve(None, Some("AUTH"), &env(&[("AUTH", "a:b")])).unwrap_err().to_string();
        assert!(e.contains("no proxy"), "{e}");
    }
}
