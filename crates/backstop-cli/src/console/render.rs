//! Showing what a message holds without letting it act: JSON
//! pretty-printed, anything else as text with every control character
//! replaced by a visible symbol, binary also as a hex dump; all of it
//! capped in size. The templates escape the result (maud), so markup in a
//! payload is text on the page.

use lapin::types::{AMQPValue, FieldTable};

/// The most bytes of a payload shown as text.
pub(crate) const SHOWN_TEXT: usize = 64 * 1024;
/// The most bytes of a payload shown as a hex dump.
pub(crate) const SHOWN_HEX: usize = 4 * 1024;
/// The most characters of one header value shown.
pub(crate) const SHOWN_HEADER: usize = 2 * 1024;

/// How a payload is shown.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PayloadView {
    /// Valid JSON, pretty-printed (and cut at [`SHOWN_TEXT`]).
    Json { pretty: String, truncated: bool },
    /// UTF-8 text that is not JSON, made inert.
    Text { text: String, truncated: bool },
    /// Anything else: a hex dump of the start and the text made inert.
    Binary {
        hex: String,
        text: String,
        hex_truncated: bool,
        text_truncated: bool,
    },
}

/// The largest payload parsed and pretty-printed as JSON; a larger one is
/// shown as text, cut at [`SHOWN_TEXT`] before anything else is done.
pub(crate) const PRETTY_MAX: usize = 256 * 1024;

/// Chooses how to show `payload`.
pub(crate) fn payload_view(payload: &[u8]) -> PayloadView {
    if payload.len() <= PRETTY_MAX
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload)
        && let Ok(pretty) = serde_json::to_string_pretty(&value)
    {
        // serde_json escapes every control character inside strings.
        let (pretty, truncated) = cut(&pretty, SHOWN_TEXT);
        return PayloadView::Json {
            pretty: pretty.to_owned(),
            truncated,
        };
    }
    // Past PRETTY_MAX only the shown part is looked at; a character cut
    // at its end is left out.
    let cut_here = payload.len() > PRETTY_MAX;
    let payload = if cut_here {
        &payload[..SHOWN_TEXT.max(SHOWN_HEX) + 1]
    } else {
        payload
    };
    let text = match std::str::from_utf8(payload) {
        Err(e) if cut_here && e.error_len().is_none() => {
            std::str::from_utf8(&payload[..e.valid_up_to()])
        }
        other => other,
    };
    match text {
        Ok(text)
            if !text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')) =>
        {
            let (shown, truncated) = cut(text, SHOWN_TEXT);
            PayloadView::Text {
                text: inert(shown),
                truncated,
            }
        }
        _ => {
            let text_part = &payload[..payload.len().min(SHOWN_TEXT)];
            let hex_part = &payload[..payload.len().min(SHOWN_HEX)];
            PayloadView::Binary {
                hex: hex_dump(hex_part),
                text: inert(&String::from_utf8_lossy(text_part)),
                hex_truncated: payload.len() > SHOWN_HEX,
                text_truncated: payload.len() > SHOWN_TEXT,
            }
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary; true when cut.
pub(crate) fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// `text` with control characters (other than newline and tab) shown as
/// their Unicode control pictures (`␀`, `␛`, `␡`) and the invisible
/// direction overrides as `<U+202E>`: nothing in it can reorder or hide the
/// text around it.
pub(crate) fn inert(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\u{0}'..='\u{1f}' => {
                out.push(char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'));
            }
            '\u{7f}' => out.push('\u{2421}'),
            '\u{80}'..='\u{9f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}' => out.push_str(&format!("<U+{:04X}>", c as u32)),
            _ => out.push(c),
        }
    }
    out
}

/// `00000000  48 65 6c 6c 6f  |Hello|`, 16 bytes a line.
pub(crate) fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 5);
    for (i, chunk) in bytes.chunks(16).enumerate() {
        out.push_str(&format!("{:08x} ", i * 16));
        for j in 0..16 {
            match chunk.get(j) {
                Some(b) => out.push_str(&format!(" {b:02x}")),
                None => out.push_str("   "),
            }
        }
        out.push_str("  |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

/// The stored headers (lapin's JSON form of a field table) as (name,
/// readable value) pairs, sorted by name, each made inert and capped.
pub(crate) fn headers(json: &str) -> Vec<(String, String)> {
    let table: FieldTable = match serde_json::from_str(json) {
        Ok(t) => t,
        Err(_) => {
            let (shown, _) = cut(json, SHOWN_HEADER);
            return vec![("(unreadable)".to_owned(), inert(shown))];
        }
    };
    let mut out: Vec<(String, String)> = table
        .inner()
        .iter()
        .map(|(k, v)| {
            let value = amqp_text(v);
            let (shown, truncated) = cut(&value, SHOWN_HEADER);
            let mut shown = inert(shown);
            if truncated {
                shown.push_str(&format!(" … ({} bytes in all)", value.len()));
            }
            (inert(k.as_str()), shown)
        })
        .collect();
    out.sort();
    out
}

/// A header value as text.
fn amqp_text(value: &AMQPValue) -> String {
    match amqp_json(value) {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// A header value as plain JSON: strings, numbers, booleans, arrays and
/// objects (bytes as lossy UTF-8). What the edit form shows.
pub(crate) fn amqp_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::String(hex::encode(b.as_slice())),
        AMQPValue::Void => Value::Null,
        other => Value::String(format!("{other:?}")),
    }
}

/// The stored properties (a JSON object) as (name, value) pairs without
/// the empty ones, made inert.
pub(crate) fn properties(json: &str) -> Vec<(String, String)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
        let (shown, _) = cut(json, SHOWN_HEADER);
        return vec![("(unreadable)".to_owned(), inert(shown))];
    };
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            let (shown, _) = cut(&text, SHOWN_HEADER);
            (inert(&k), inert(shown))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_pretty_printed() {
        let view = payload_view(br#"{"a":[1,"<script>"]}"#);
        let PayloadView::Json { pretty, truncated } = view else {
            panic!("not json: {view:?}");
        };
        assert!(!truncated);
        assert!(pretty.contains("\n  \"a\": [\n"), "{pretty}");
    }

    #[test]
    fn control_characters_and_invalid_utf8_are_inert() {
        assert_eq!(
            inert("a\u{0}b\u{1b}[31m\u{7f}\u{202e}c\n"),
            "a␀b␛[31m␡<U+202E>c\n"
        );
        let view = payload_view(b"ab\x00\xff\xfe<script>");
        let PayloadView::Binary { hex, text, .. } = view else {
            panic!("not binary: {view:?}");
        };
        assert!(hex.starts_with("00000000  61 62 00 ff fe 3c"), "{hex}");
        assert!(hex.contains("|ab...<script>|"), "{hex}");
        assert_eq!(text, "ab␀\u{fffd}\u{fffd}<script>");
    }

    #[test]
    fn long_payloads_are_cut_on_a_character_boundary() {
        let long = "é".repeat(SHOWN_TEXT);
        let PayloadView::Text { text, truncated } = payload_view(long.as_bytes()) else {
            panic!("not text");
        };
        assert!(truncated);
        assert!(text.len() <= SHOWN_TEXT && text.len() > SHOWN_TEXT - 4);
    }

    #[test]
    fn headers_are_readable() {
        let json = r#"{"x-tenant":{"LongString":[97,0]},"n":{"LongLongInt":5}}"#;
        assert_eq!(
            headers(json),
            vec![
                ("n".to_owned(), "5".to_owned()),
                ("x-tenant".to_owned(), "a␀".to_owned())
            ]
        );
    }
}
