//! JSON log lines (`RECEIPT_GATEWAY_LOG_FORMAT=json`), written by hand.
//!
//! The line is the one tracing-subscriber's `json().flatten_event(true)` writes —
//! `{"timestamp":"…Z","level":"INFO","message":…,<fields>…,"target":…}` — without its
//! cost: that formatter drives serde_json through an `io::Write` to `fmt::Write` adaptor
//! (a UTF-8 check per fragment) and formats the timestamp into a fresh `String` per
//! event, which made a request's log line cost about half as much again as the request
//! (docs/benchmarks.md). Here every fragment is pushed straight into the subscriber's
//! reused line buffer. The gateway opens no spans, so none are written.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter: one JSON object per line.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_char('"')?;
        let mut fields = Fields { out: &mut writer, result: Ok(()), log_target: None };
        event.record(&mut fields);
        fields.result?;
        // A record of the `log` crate (from redis or rustls, through tracing-log) has
        // target "log"; its own target is a field, and is the line's target, as
        // tracing-subscriber's formatter writes it.
        let target = fields.log_target.take();
        writer.write_str(",\"target\":")?;
        write_string(&mut writer, target.as_deref().unwrap_or(meta.target()))?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`; the first error stops the rest.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
    /// The `log.target` field of a record of the `log` crate.
    log_target: Option<String>,
}

impl Fields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_char(',')?;
                write_string(self.out, field.name())?;
                self.out.write_char(':')?;
                value(self.out)
            })();
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.log_target = Some(value.to_owned());
        }
        self.entry(field, |out| write_string(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| out.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's choice: a number when finite, else null. Rust's `Display` of a
        // finite f64 is the shortest form that reads back the same and never uses an
        // exponent, which JSON accepts; a whole number keeps serde_json's ".0".
        self.entry(field, |out| match value {
            v if !v.is_finite() => out.write_str("null"),
            v if v.fract() == 0.0 && v.abs() < 1e16 => write!(out, "{v:.1}"),
            v => write!(out, "{v}"),
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_char('"')?;
            write!(Escaping(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// A JSON string literal.
fn write_string(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_str(s)?;
    out.write_char('"')
}

/// Escapes what passes through for the inside of a JSON string: runs of plain
/// characters are copied whole.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// RFC 3339 in UTC with microseconds, as tracing-subscriber's default timer writes it.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    )
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// The events the gateway writes, with every kind of field and text that needs escaping.
    fn emit() {
        let method = http::Method::POST;
        tracing::info!(
            method = %method,
            path = "/v4/group_open_http_svc/get_group_msg_receipt",
            request_id = "id \"quoted\" \\ back\u{1}slash\n",
            sdkappid = %1400000001u64,
            items = 5usize,
            status = 200u16,
            negative = -3i64,
            ok = true,
            duration_ms = 0.123456f64,
            whole_ms = 2.0f64,
            not_a_number = f64::NAN,
            unicode = "读了 ✓",
            debug = ?Some("x"),
            "request"
        );
        tracing::warn!(error = %"upstream \"failed\"", "message with {} braces", 2);
    }

    fn captured(json: bool) -> String {
        let lines = Lines::default();
        let writer = lines.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || writer.clone());
        let dispatch = if json {
            tracing::Dispatch::new(builder.json().flatten_event(true).finish())
        } else {
            tracing::Dispatch::new(builder.event_format(JsonLines).finish())
        };
        tracing::dispatcher::with_default(&dispatch, emit);
        lines.text()
    }

    fn without_timestamp(line: &str) -> (serde_json::Value, String) {
        let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
        let timestamp = value.as_object_mut().unwrap().remove("timestamp").unwrap();
        (value, timestamp.as_str().unwrap().to_owned())
    }

    #[test]
    fn lines_read_as_tracing_subscribers_json_lines_do() {
        let ours = captured(false);
        let theirs = captured(true);
        assert_eq!(ours.lines().count(), 2);
        for (a, b) in ours.lines().zip(theirs.lines()) {
            let (a_value, a_time) = without_timestamp(a);
            let (b_value, b_time) = without_timestamp(b);
            assert_eq!(a_value, b_value, "ours: {a}\ntheirs: {b}");
            // Same shape: 2026-12-02T12:21:48.123456Z.
            assert_eq!(a_time.len(), b_time.len());
            assert_eq!(a_time[..16], b_time[..16], "written within the same minute");
        }
        // Keys in the same order, message first after the level.
        assert!(ours.lines().next().unwrap().contains(r#""level":"INFO","message":"request","method":"POST""#));
    }

    #[test]
    fn a_log_crate_record_keeps_its_own_target() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).event_format(JsonLines).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::event!(target: "log", tracing::Level::INFO, log.target = "rustls::client", log.line = 7u64, "from log");
        });
        let value: serde_json::Value = serde_json::from_str(lines.text().trim()).unwrap();
        assert_eq!(value["target"], "rustls::client");
        assert_eq!(value["log.line"], 7);
        assert_eq!(value["message"], "from log");
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |secs: u64, micros: u64| {
            let mut s = String::new();
            write_timestamp(&mut s, UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_213_885, 734_874), "2026-12-02T12:18:05.734874Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
    }
}
