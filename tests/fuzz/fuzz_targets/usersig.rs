//! UserSig decoding and verification (`usersig::decode`, `usersig::verify`), which the
//! simulator runs on every call and which must refuse, never crash on, whatever arrives.
//!
//! The first byte picks how the rest is used:
//! - 0: as the UserSig string itself (the base64 and zlib layers);
//! - 1: as the JSON document inside one, wrapped as a UserSig is (zlib, base64, the URL
//!   escapes), so the fuzzer reaches the document and signature checks;
//! - else: as an identifier, key, time and lifetime to sign with `sign`.
//!
//! Properties: no panic; `verify` accepts only a document for the app and identifier
//! asked, signed with the key, and not expired at `now`; a UserSig made by `sign`
//! decodes to what was signed, verifies until `time + expire` and not after, and is
//! refused for another identifier, app or key.
//!
//! Known limit, not asserted: `decode` reads at most 4096 bytes of document, and `sign`
//! does not bound the identifier, so an identifier of about 3,950 bytes or more (fewer
//! with escapes: 700 control characters) is signed into a UserSig that `decode` and
//! `verify` refuse as malformed. Tencent's identifiers are at most 32 bytes; the config
//! does not bound `apps.identifier`. The round trip is checked below that size.
#![no_main]

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::write::ZlibEncoder;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use receipt_gateway::tencent::domain::AppId;
use receipt_gateway::tencent::usersig::{SecretKey, VerifyError, decode, sign, tls_sig, verify};

const APP: AppId = AppId(1_400_000_000);
const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
/// The public test vector's moment (its identifier is "0"), so seeds can be real ones.
const NOW: u64 = 1_569_910_200;
/// The most document `decode` reads (`MAX_DOC_BYTES` in src/usersig.rs).
const DOC_BOUND: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => checked(&String::from_utf8_lossy(rest)),
        1 => checked(&wrapped(rest)),
        _ => {
            let _ = signed(&mut Unstructured::new(rest));
        }
    }
});

/// Decodes and verifies a string as the simulator would.
fn checked(usersig: &str) {
    let decoded = decode(usersig);
    let key = SecretKey::new(KEY);
    let Ok(doc) = &decoded else {
        assert_eq!(verify(usersig, APP, "0", &key, NOW), Err(VerifyError::Malformed));
        return;
    };
    let identifier = doc.identifier.as_str();
    match verify(usersig, APP, identifier, &key, NOW) {
        Ok(verified) => {
            assert_eq!(&verified, doc, "verify returned another document than decode");
            assert_eq!(doc.sdkappid, APP.0, "verified for another app");
            assert_eq!(doc.sig, tls_sig(APP, &key, identifier, doc.time, doc.expire), "verified a wrong signature");
            assert!(NOW <= doc.time.saturating_add(doc.expire), "verified an expired UserSig");
        }
        Err(VerifyError::WrongIdentifier) => panic!("refused for its own identifier"),
        Err(_) => {}
    }
}

/// `doc` as the inside of a UserSig: zlib, base64, then the URL escapes of `sign`.
fn wrapped(doc: &[u8]) -> String {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::fast());
    // Writing into a Vec cannot fail.
    z.write_all(doc).unwrap();
    let b64 = STANDARD.encode(z.finish().unwrap());
    b64.chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

/// Signs fuzzed values and checks the UserSig round-trips through decode and verify.
fn signed(u: &mut Unstructured<'_>) -> Result<()> {
    let identifier: String = u.arbitrary()?;
    let key_text: String = u.arbitrary()?;
    let time: u64 = u.arbitrary()?;
    let expire: u64 = u.arbitrary()?;
    let key = SecretKey::new(key_text.clone());
    let sig = sign(APP, &key, &identifier, time, expire);
    // Serialising a string cannot fail. The rest of the document is under 200 bytes.
    if serde_json::to_string(&identifier).unwrap().len() > DOC_BOUND - 200 {
        let _ = verify(sig.expose(), APP, &identifier, &key, time);
        return Ok(());
    }
    let doc = decode(sig.expose()).expect("a signed UserSig decodes");
    assert_eq!((doc.ver.as_str(), doc.identifier.as_str()), ("2.0", identifier.as_str()));
    assert_eq!((doc.sdkappid, doc.time, doc.expire), (APP.0, time, expire));
    let verified = verify(sig.expose(), APP, &identifier, &key, time);
    assert_eq!(verified.as_ref(), Ok(&doc), "a signed UserSig does not verify when issued");
    let last = time.saturating_add(expire);
    assert!(verify(sig.expose(), APP, &identifier, &key, last).is_ok(), "refused at its last valid second");
    if let Some(after) = last.checked_add(1) {
        assert_eq!(verify(sig.expose(), APP, &identifier, &key, after), Err(VerifyError::Expired));
    }
    let other = format!("{identifier}x");
    assert_eq!(verify(sig.expose(), APP, &other, &key, time), Err(VerifyError::WrongIdentifier));
    assert_eq!(verify(sig.expose(), AppId(APP.0 + 1), &identifier, &key, time), Err(VerifyError::WrongApp));
    // Not a zero byte: HMAC pads short keys with zeros, so "k" and "k\0" are one key.
    let wrong = SecretKey::new(format!("{key_text}!"));
    assert_eq!(verify(sig.expose(), APP, &identifier, &wrong, time), Err(VerifyError::BadSignature));
    Ok(())
}
