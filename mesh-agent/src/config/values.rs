//! The one home of scalar value parsing: durations, percentages, header names and values, and
//! string matches. Every function returns a [`ValueError`] whose text is the "reason" part of a
//! diagnostic; the caller adds file, object and field.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::model::{Percent, RetryOn, StringMatch};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error(
        "invalid duration {0:?}: expected a number with a unit, like 1s, 500ms, 1m30s, 0.5s or 1h"
    )]
    BadDuration(String),
    #[error("invalid duration {0:?}: must not be negative")]
    NegativeDuration(String),
    #[error("invalid duration {0:?}: too large")]
    DurationOverflow(String),
    #[error("percentage {0} is outside 0–100")]
    PercentOutOfRange(String),
    #[error("invalid header name {0:?}")]
    BadHeaderName(String),
    #[error("header value {0:?} contains CR or LF")]
    HeaderValueNewline(String),
    #[error("header value {0:?} contains an invalid character")]
    BadHeaderValue(String),
    #[error("invalid regex: {0}")]
    BadRegex(String),
    #[error("exactly one of exact, prefix, regex must be set, found {0}")]
    StringMatchKinds(usize),
    #[error("unknown retryOn condition(s) {}: expected Envoy's conditions (5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, retriable-status-codes, ...), gRPC ones (cancelled, deadline-exceeded, internal, resource-exhausted, unavailable) or HTTP status codes", .0.join(", "))]
    UnknownRetryOn(Vec<String>),
}

/// Parses a Go/Istio duration: one or more `<number><unit>` parts (`1m30s`), fractions allowed
/// (`0.5s`, the protobuf JSON form `1.5s`), units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`; plain
/// `0` is zero. A leading `-` is rejected as negative rather than as malformed, so the user
/// learns what is actually wrong.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let bad = || ValueError::BadDuration(text.to_owned());
    let trimmed = text.trim();
    let (negative, mut rest) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        rest = after;

        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        // Nanosecond resolution needs at most 18 fraction digits (hours × 10⁻¹⁸ < 1 ns);
        // ignoring the rest also keeps the arithmetic in range.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().map_err(|_| bad())?;
            digits * unit_nanos / 10u128.pow(fraction.len() as u32)
        };
        total_nanos = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(total_nanos))
            .ok_or_else(|| ValueError::DurationOverflow(text.to_owned()))?;
    }
    if negative && total_nanos > 0 {
        return Err(ValueError::NegativeDuration(text.to_owned()));
    }
    let nanos =
        u64::try_from(total_nanos).map_err(|_| ValueError::DurationOverflow(text.to_owned()))?;
    Ok(Duration::from_nanos(nanos))
}

/// Istio's `Percent { value: double }`, in [0, 100].
pub fn percent_from_f64(value: f64) -> Result<Percent, ValueError> {
    if !value.is_finite() || !(0.0..=100.0).contains(&value) {
        return Err(ValueError::PercentOutOfRange(value.to_string()));
    }
    // In range, so the product is within [0, 1e6] and the cast cannot truncate.
    let per_million = (value * 10_000.0).round() as u32;
    Ok(Percent { per_million })
}

/// The legacy integer forms (`percent: 10`, `mirror_percent: 50`), in [0, 100].
pub fn percent_from_int(value: i64) -> Result<Percent, ValueError> {
    match u32::try_from(value) {
        Ok(whole) if whole <= 100 => Ok(Percent {
            per_million: whole * 10_000,
        }),
        _ => Err(ValueError::PercentOutOfRange(value.to_string())),
    }
}

/// A header name, lower-cased (HTTP/2 and Envoy compare names in lower case).
pub fn header_name(name: &str) -> Result<HeaderName, ValueError> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| ValueError::BadHeaderName(name.to_owned()))
}

/// A header value: CR and LF are named separately because they are the header-injection risk.
pub fn header_value(value: &str) -> Result<HeaderValue, ValueError> {
    if value.contains(['\r', '\n']) {
        return Err(ValueError::HeaderValueNewline(value.to_owned()));
    }
    HeaderValue::from_bytes(value.as_bytes())
        .map_err(|_| ValueError::BadHeaderValue(value.to_owned()))
}

/// A regex anchored to match the whole input, as Envoy's RE2 `safe_regex` does.
pub fn full_match_regex(pattern: &str) -> Result<Regex, ValueError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| ValueError::BadRegex(e.to_string()))
}

/// Istio's `StringMatch` oneof. `allow_empty` is for header and query-parameter matches,
/// where Istio reads `{}` as "present with any value": that is `Prefix("")`.
pub fn string_match(
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    allow_empty: bool,
) -> Result<StringMatch, ValueError> {
    match (exact, prefix, regex) {
        (Some(exact), None, None) => Ok(StringMatch::Exact(exact)),
        (None, Some(prefix), None) => Ok(StringMatch::Prefix(prefix)),
        (None, None, Some(regex)) => full_match_regex(&regex).map(StringMatch::Regex),
        (None, None, None) if allow_empty => Ok(StringMatch::Prefix(String::new())),
        (exact, prefix, regex) => Err(ValueError::StringMatchKinds(
            [exact.is_some(), prefix.is_some(), regex.is_some()]
                .iter()
                .filter(|set| **set)
                .count(),
        )),
    }
}

/// Istio's comma-separated `retryOn`: Envoy's HTTP and gRPC conditions plus bare status codes
/// (Istio turns those into `retriable-status-codes`). Empty items are skipped, as Istio does.
pub fn parse_retry_on(text: &str) -> Result<RetryOn, ValueError> {
    let mut on = RetryOn::default();
    let mut unknown = Vec::new();
    for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let flag = match token {
            "5xx" => &mut on.five_xx,
            "gateway-error" => &mut on.gateway_error,
            "reset" => &mut on.reset,
            "reset-before-request" => &mut on.reset_before_request,
            "connect-failure" => &mut on.connect_failure,
            "envoy-ratelimited" => &mut on.envoy_ratelimited,
            "retriable-4xx" => &mut on.retriable_4xx,
            "refused-stream" => &mut on.refused_stream,
            "retriable-headers" => &mut on.retriable_headers,
            "http3-post-connect-failure" => &mut on.http3_post_connect_failure,
            "cancelled" => &mut on.cancelled,
            "deadline-exceeded" => &mut on.deadline_exceeded,
            "internal" => &mut on.internal,
            "resource-exhausted" => &mut on.resource_exhausted,
            "unavailable" => &mut on.unavailable,
            // Enables matching on the code list, which the bare codes fill.
            "retriable-status-codes" => continue,
            _ => {
                match token.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => {
                        if !on.retriable_status_codes.contains(&code) {
                            on.retriable_status_codes.push(code);
                        }
                    }
                    _ => unknown.push(format!("{token:?}")),
                }
                continue;
            }
        };
        *flag = true;
    }
    if unknown.is_empty() {
        Ok(on)
    } else {
        Err(ValueError::UnknownRetryOn(unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("1s", Duration::from_secs(1)),
            ("500ms", Duration::from_millis(500)),
            ("1m30s", Duration::from_secs(90)),
            ("0.5s", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            (".25s", Duration::from_millis(250)),
            ("1h", Duration::from_secs(3600)),
            ("2h45m", Duration::from_secs(9900)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0s", Duration::ZERO),
            (" 3s ", Duration::from_secs(3)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for text in ["", "1", "s", "1x", "1.2.3s", "1 s", "abc", "1s2", "-", "."] {
            assert_eq!(
                parse_duration(text),
                Err(ValueError::BadDuration(text.into())),
                "{text}"
            );
        }
        assert_eq!(
            parse_duration("-1s"),
            Err(ValueError::NegativeDuration("-1s".into()))
        );
        assert!(matches!(
            parse_duration("99999999999999999h"),
            Err(ValueError::DurationOverflow(_))
        ));
    }

    #[test]
    fn percentages() {
        assert_eq!(
            percent_from_f64(12.5),
            Ok(Percent {
                per_million: 125_000
            })
        );
        assert_eq!(percent_from_f64(0.0001), Ok(Percent { per_million: 1 }));
        assert_eq!(percent_from_f64(100.0), Ok(Percent::HUNDRED));
        assert_eq!(percent_from_f64(0.0), Ok(Percent::ZERO));
        for bad in [-0.1, 100.01, f64::NAN, f64::INFINITY] {
            assert!(percent_from_f64(bad).is_err(), "{bad}");
        }
        assert_eq!(
            percent_from_int(10),
            Ok(Percent {
                per_million: 100_000
            })
        );
        assert!(percent_from_int(101).is_err());
        assert!(percent_from_int(-1).is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(
            header_name("X-Version").map(|n| n.to_string()),
            Ok("x-version".into())
        );
        assert!(header_name("bad name").is_err());
        assert!(header_name("").is_err());
        assert!(header_value("v2").is_ok());
        assert!(header_value("a\tb c").is_ok());
        assert_eq!(
            header_value("a\r\nx-injected: 1"),
            Err(ValueError::HeaderValueNewline("a\r\nx-injected: 1".into()))
        );
        assert_eq!(
            header_value("a\u{0}b"),
            Err(ValueError::BadHeaderValue("a\u{0}b".into()))
        );
    }

    #[test]
    fn retry_on() {
        let all = "5xx,gateway-error,reset,reset-before-request,connect-failure,envoy-ratelimited,\
                   retriable-4xx,refused-stream,retriable-status-codes,retriable-headers,\
                   http3-post-connect-failure,cancelled,deadline-exceeded,internal,\
                   resource-exhausted,unavailable,503, 504,";
        let on = parse_retry_on(all).expect("every token is known");
        assert!(on.five_xx && on.gateway_error && on.reset && on.reset_before_request);
        assert!(on.connect_failure && on.envoy_ratelimited && on.retriable_4xx);
        assert!(on.refused_stream && on.retriable_headers && on.http3_post_connect_failure);
        assert!(on.cancelled && on.deadline_exceeded && on.internal);
        assert!(on.resource_exhausted && on.unavailable);
        assert_eq!(on.retriable_status_codes, vec![503, 504]);
        assert_eq!(
            parse_retry_on("5xx,bogus,600"),
            Err(ValueError::UnknownRetryOn(vec![
                "\"bogus\"".into(),
                "\"600\"".into()
            ]))
        );
    }

    #[test]
    fn string_matches() {
        let Ok(StringMatch::Regex(re)) = string_match(None, None, Some("/v[0-9]+".into()), false)
        else {
            panic!("regex should compile");
        };
        assert!(re.is_match("/v12"));
        assert!(
            !re.is_match("/v12/x"),
            "regex must be anchored to full match"
        );
        assert!(matches!(
            string_match(None, None, Some("(".into()), false),
            Err(ValueError::BadRegex(_))
        ));
        assert_eq!(
            string_match(Some("a".into()), Some("b".into()), None, false).map(|_| ()),
            Err(ValueError::StringMatchKinds(2))
        );
        assert_eq!(
            string_match(None, None, None, false).map(|_| ()),
            Err(ValueError::StringMatchKinds(0))
        );
        assert!(matches!(
            string_match(None, None, None, true),
            Ok(StringMatch::Prefix(p)) if p.is_empty()
        ));
    }
}
