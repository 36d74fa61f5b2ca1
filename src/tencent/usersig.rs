//! TLSSigAPIv2 UserSig: signing and verification, pure functions with no I/O.
//!
//! The gateway signs with it (upstream), the simulator verifies with it, and the
//! `usersig` subcommand prints one. Key material and signatures live in [`SecretKey`]
//! and [`UserSig`], whose `Debug` output is redacted so neither can reach a log by way
//! of a `?field`.

use std::fmt;
use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::tencent::domain::AppId;

/// An app's secret key exactly as the console shows it (its UTF-8 bytes are the HMAC key).
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The secret itself, for the one place that must compare or send it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A signed UserSig. Only `expose` gives the string, for the one place that must send it.
#[derive(Clone, PartialEq, Eq)]
pub struct UserSig(String);

impl UserSig {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserSig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserSig(<redacted>)")
    }
}

/// The signed document, in Tencent's field order.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct SigDoc {
    #[serde(rename = "TLS.ver")]
    pub ver: String,
    #[serde(rename = "TLS.identifier")]
    pub identifier: String,
    #[serde(rename = "TLS.sdkappid")]
    pub sdkappid: u64,
    #[serde(rename = "TLS.expire")]
    pub expire: u64,
    #[serde(rename = "TLS.time")]
    pub time: u64,
    #[serde(rename = "TLS.sig")]
    pub sig: String,
}

/// Why a UserSig was refused. The simulator maps `Expired` to 70001 and the rest to 70009.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("usersig is not well-formed")]
    Malformed,
    #[error("usersig was issued for another sdkappid")]
    WrongApp,
    #[error("usersig was issued for another identifier")]
    WrongIdentifier,
    #[error("usersig signature does not match")]
    BadSignature,
    #[error("usersig has expired")]
    Expired,
}

/// A decompressed UserSig is a few hundred bytes; anything much larger is an attack.
const MAX_DOC_BYTES: u64 = 4096;

/// `TLS.sig`: base64 of HMAC-SHA256 over the newline-terminated content lines.
pub fn tls_sig(app: AppId, key: &SecretKey, identifier: &str, time: u64, expire: u64) -> String {
    STANDARD.encode(mac(app, key, identifier, time, expire).finalize().into_bytes())
}

fn mac(app: AppId, key: &SecretKey, identifier: &str, time: u64, expire: u64) -> Hmac<Sha256> {
    let content = format!("TLS.identifier:{identifier}\nTLS.sdkappid:{app}\nTLS.time:{time}\nTLS.expire:{expire}\n");
    // HMAC accepts keys of any length, so this cannot fail; an empty key only happens
    // in tests and still yields a MAC.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(content.as_bytes());
    mac
}

/// Signs a UserSig valid for `expire` seconds from `time` (Unix seconds).
pub fn sign(app: AppId, key: &SecretKey, identifier: &str, time: u64, expire: u64) -> UserSig {
    let doc = SigDoc {
        ver: "2.0".into(),
        identifier: identifier.into(),
        sdkappid: app.0,
        expire,
        time,
        sig: tls_sig(app, key, identifier, time, expire),
    };
    // A struct of strings and integers always serialises, and writing into a Vec cannot
    // fail, so the fallbacks below are never taken.
    let json = serde_json::to_vec(&doc).unwrap_or_default();
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    let _ = z.write_all(&json);
    let compressed = z.finish().unwrap_or_default();
    UserSig(escape(&STANDARD.encode(compressed)))
}

/// Decodes a UserSig without checking it: the reverse of steps 4 and 3.
pub fn decode(usersig: &str) -> Result<SigDoc, VerifyError> {
    let compressed = STANDARD.decode(unescape(usersig)).map_err(|_| VerifyError::Malformed)?;
    let mut json = Vec::new();
    ZlibDecoder::new(compressed.as_slice())
        .take(MAX_DOC_BYTES)
        .read_to_end(&mut json)
        .map_err(|_| VerifyError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| VerifyError::Malformed)
}

/// Verifies a UserSig for `app`/`identifier` at `now` (Unix seconds): the signature
/// first, in constant time, so a forgery never learns whether it would have expired.
pub fn verify(usersig: &str, app: AppId, identifier: &str, key: &SecretKey, now: u64) -> Result<SigDoc, VerifyError> {
    let doc = decode(usersig)?;
    if doc.sdkappid != app.0 {
        return Err(VerifyError::WrongApp);
    }
    if doc.identifier != identifier {
        return Err(VerifyError::WrongIdentifier);
    }
    let claimed = STANDARD.decode(&doc.sig).map_err(|_| VerifyError::Malformed)?;
    mac(app, key, identifier, doc.time, doc.expire).verify_slice(&claimed).map_err(|_| VerifyError::BadSignature)?;
    if now > doc.time.saturating_add(doc.expire) {
        return Err(VerifyError::Expired);
    }
    Ok(doc)
}

fn escape(b64: &str) -> String {
    b64.chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

fn unescape(sig: &str) -> String {
    sig.chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY1: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
    const KEY2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const PUBLIC: &str = "eJyrVgrxCdYrSy1SslIy0jNQ0gHzM1NS80oy0zLBwjDB4pTsxIKCzBQlK0MTAyiAyKRWFGQWpQLFTU1NjeCiJZm5YDEzS0tDAyOYaHFmOtBM54KsUqeUwGLLqPK8UndHryCL-Lx8-1RPy7Ty1AijMk9f30hLk0x-r3CvSFulWgAPYy*9";
    const APP: AppId = AppId(1_400_000_000);

    #[test]
    fn tls_sig_matches_both_spec_vectors() {
        let k1 = SecretKey::new(KEY1);
        let k2 = SecretKey::new(KEY2);
        assert_eq!(tls_sig(APP, &k1, "0", 1569910200, 15552000), "CpjuBdQs9ZwnuGAJR8onoOeI9fweX2vIMMY94iOJWJY=");
        assert_eq!(
            tls_sig(APP, &k2, "administrator", 1700000000, 86400),
            "9awWeUL8MxxbBn8dhB0Jvuo0JKIh4dNCLkGIX4n5fd0="
        );
    }

    #[test]
    fn the_public_usersig_decodes_and_verifies() {
        let doc = verify(PUBLIC, APP, "0", &SecretKey::new(KEY1), 1569910200).unwrap();
        assert_eq!(doc.ver, "2.0");
        assert_eq!((doc.time, doc.expire), (1569910200, 15552000));
        assert_eq!(doc.sig, "CpjuBdQs9ZwnuGAJR8onoOeI9fweX2vIMMY94iOJWJY=");
    }

    #[test]
    fn a_signed_usersig_decodes_to_the_spec_document() {
        let sig = sign(APP, &SecretKey::new(KEY2), "administrator", 1700000000, 86400);
        let doc = decode(sig.expose()).unwrap();
        assert_eq!(
            doc,
            SigDoc {
                ver: "2.0".into(),
                identifier: "administrator".into(),
                sdkappid: APP.0,
                expire: 86400,
                time: 1700000000,
                sig: "9awWeUL8MxxbBn8dhB0Jvuo0JKIh4dNCLkGIX4n5fd0=".into(),
            }
        );
        assert!(!sig.expose().contains(['+', '/', '=']));
    }

    #[test]
    fn verification_rejects_each_kind_of_wrong_usersig() {
        let key = SecretKey::new(KEY2);
        let sig = sign(APP, &key, "administrator", 1000, 100);
        let ok = |s: &str, app, id: &str, key: &SecretKey, now| verify(s, app, id, key, now);
        assert!(ok(sig.expose(), APP, "administrator", &key, 1100).is_ok());
        assert_eq!(ok(sig.expose(), APP, "administrator", &key, 1101).unwrap_err(), VerifyError::Expired);
        assert_eq!(ok(sig.expose(), AppId(1), "administrator", &key, 1000).unwrap_err(), VerifyError::WrongApp);
        assert_eq!(ok(sig.expose(), APP, "bob", &key, 1000).unwrap_err(), VerifyError::WrongIdentifier);
        let other = SecretKey::new(KEY1);
        assert_eq!(ok(sig.expose(), APP, "administrator", &other, 1000).unwrap_err(), VerifyError::BadSignature);
        // A forged signature that has also expired is reported as forged.
        assert_eq!(ok(sig.expose(), APP, "administrator", &other, 9999).unwrap_err(), VerifyError::BadSignature);
        assert_eq!(ok("not a sig", APP, "administrator", &key, 1000).unwrap_err(), VerifyError::Malformed);
    }

    #[test]
    fn secrets_do_not_print() {
        let key = SecretKey::new(KEY1);
        let sig = sign(APP, &key, "0", 1, 1);
        assert!(!format!("{key:?}{sig:?}").contains(&KEY1[..8]));
        assert!(!format!("{sig:?}").contains(&sig.expose()[..8]));
    }

    proptest::proptest! {
        #[test]
        fn any_signed_usersig_verifies(id in "[a-zA-Z0-9_@.-]{1,32}", time in 0u64..4_000_000_000, expire in 1u64..100_000_000, key in ".{1,64}") {
            let key = SecretKey::new(key);
            let sig = sign(APP, &key, &id, time, expire);
            proptest::prop_assert!(verify(sig.expose(), APP, &id, &key, time + expire).is_ok());
        }
    }
}
