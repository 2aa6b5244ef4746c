//! Python-compatible formatting of template values.
//!
//! transformers renders chat templates with Python's jinja2, so output must follow Python:
//! `tojson` is `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)` (default
//! separators `", "` / `": "`, no HTML escaping, keys in insertion order), and `{{ x }}` / `|string`
//! print `str(x)` (`True`, `None`, `['a', 1]`, `1.0`). minijinja's own defaults differ on all of
//! these, so they are reimplemented here.

use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

/// Options of Python's `json.dumps` that chat templates use.
#[derive(Debug, Clone)]
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None` = single line; `Some(s)` = newline + `s` repeated per level (an int indent n is n spaces).
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl Default for JsonOptions {
    fn default() -> Self {
        Self { ensure_ascii: false, indent: None, item_sep: ", ".into(), key_sep: ": ".into(), sort_keys: false }
    }
}

/// Deepest container nesting printed. A template can build a value that holds itself
/// (`{% set ns.x = ns %}`); Python prints such a cycle as `[...]` or refuses it in `json.dumps`, but a
/// minijinja value does not expose its identity, so nesting beyond this depth is an error instead of
/// a recursion without end. No chat template nests data this deep.
const MAX_DEPTH: usize = 200;

fn too_deep() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("value nested deeper than {MAX_DEPTH} levels (a container that holds itself?)"),
    )
}

/// `json.dumps` of a template value.
pub(crate) fn dumps(value: &Value, opts: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, value, opts, 0)?;
    Ok(out)
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOptions, level: usize) -> Result<(), Error> {
    if level > MAX_DEPTH {
        return Err(too_deep());
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number_json(out, v),
        ValueKind::String => write_json_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, opts, level, '[', ']', &items, |out, item, lvl| write_json(out, item, opts, lvl))?;
        }
        ValueKind::Map => {
            let mut pairs = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                pairs.push((json_key(&key)?, val));
            }
            if opts.sort_keys {
                // Python compares str keys by code point, which is byte order for UTF-8.
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, opts, level, '{', '}', &pairs, |out, (k, val), lvl| {
                write_json_string(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, val, opts, lvl)
            })?;
        }
        ValueKind::Undefined => {
            return Err(Error::new(ErrorKind::InvalidOperation, "Object of type Undefined is not JSON serializable"));
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    opts: &JsonOptions,
    level: usize,
    open: char,
    close: char,
    items: &[T],
    mut each: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    // Python: with an indent, the item separator is used as given (default "," then), and each item
    // goes on its own line; without, items are joined by the separator on one line.
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(ind) = &opts.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level + 1));
        }
        each(out, item, level + 1)?;
    }
    if let Some(ind) = &opts.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// Python converts non-string dict keys: `True` → "true", `None` → "null", numbers via repr.
fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number_json(&mut s, key);
            s
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {kind}"),
            ));
        }
    })
}

fn write_number_json(out: &mut String, v: &Value) {
    if v.is_integer() {
        // Integers print exactly (minijinja displays i64/u64/i128 without loss).
        let _ = write!(out, "{v}");
    } else {
        let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
        out.push_str(&float_repr_json(f));
    }
}

fn float_repr_json(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        float_repr(f)
    }
}

/// Python `repr(float)`: shortest round-trip digits; scientific when the exponent is < -4 or
/// >= 16 (`1e+16`, `1.5e-05`), otherwise positional with at least one decimal (`1.0`).
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e6" or "1e-7".
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
            out.push_str(".0");
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
    out
}

/// JSON string escaping as Python's json module does it (lowercase hex, `\u00XX` for other
/// control characters, DEL and non-ASCII kept unless `ensure_ascii`, which keeps only
/// [`CONTENT_MARK`](crate::tokenizer::CONTENT_MARK)).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // The content mark stays a character: escaped, it would no longer mark the special
            // token after it (and no client text holds one: mark_content replaced those).
            c if ensure_ascii && !c.is_ascii() && c != crate::tokenizer::CONTENT_MARK => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python `str(x)` of a template value (what jinja2 prints for `{{ x }}` and `|string`).
pub(crate) fn py_str(v: &Value) -> Result<String, Error> {
    Ok(match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(v)?,
    })
}

/// Python `repr(x)` of a template value (used inside containers).
pub(crate) fn py_repr(v: &Value) -> Result<String, Error> {
    let mut out = String::new();
    write_repr(&mut out, v, 0)?;
    Ok(out)
}

fn write_repr(out: &mut String, v: &Value, level: usize) -> Result<(), Error> {
    if level > MAX_DEPTH {
        return Err(too_deep());
    }
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                out.push_str(&float_repr(f64::try_from(v.clone()).unwrap_or(f64::NAN)));
            }
        }
        ValueKind::String => write_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(out, &item, level + 1)?;
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(out, &key, level + 1)?;
                    out.push_str(": ");
                    write_repr(out, &v.get_item(&key).unwrap_or_default(), level + 1)?;
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
    Ok(())
}

/// Python string repr: single quotes unless the text has `'` and no `"`.
fn write_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python `str.isspace()` per character: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Python counts and Rust's `char::is_whitespace` does not.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789012345.6, "123456789012345.6"),
            (1e15, "1000000000000000.0"),
            (1.2345e100, "1.2345e+100"),
            (-0.0, "-0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn dumps_defaults_and_indent() {
        let v = Value::from_pairs([
            ("b", Value::from(vec![Value::from(1), Value::from(true), Value::from(())])),
            ("a", Value::from("é\"<>\u{1}")),
        ]);
        assert_eq!(dumps(&v, &JsonOptions::default()).unwrap(), "{\"b\": [1, true, null], \"a\": \"é\\\"<>\\u0001\"}");
        let opts =
            JsonOptions { indent: Some("  ".into()), item_sep: ",".into(), sort_keys: true, ..JsonOptions::default() };
        assert_eq!(
            dumps(&v, &opts).unwrap(),
            "{\n  \"a\": \"é\\\"<>\\u0001\",\n  \"b\": [\n    1,\n    true,\n    null\n  ]\n}"
        );
        let ascii = JsonOptions { ensure_ascii: true, ..JsonOptions::default() };
        assert_eq!(dumps(&Value::from("é😀"), &ascii).unwrap(), "\"\\u00e9\\ud83d\\ude00\"");
    }

    #[test]
    fn str_and_repr() {
        assert_eq!(py_str(&Value::from(true)).unwrap(), "True");
        assert_eq!(py_str(&Value::from(())).unwrap(), "None");
        assert_eq!(py_str(&Value::from(2.0)).unwrap(), "2.0");
        let l = Value::from(vec![Value::from("a'b"), Value::from("c"), Value::from(1)]);
        assert_eq!(py_str(&l).unwrap(), "[\"a'b\", 'c', 1]");
    }
}
