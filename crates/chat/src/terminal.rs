//! Model output is untrusted text: before any of it reaches the terminal, control characters
//! that could move the cursor, rewrite the line, change the window title, retitle a hyperlink
//! or reorder what is shown (escape sequences, carriage return, backspace, C1 controls, bidi
//! overrides) are replaced by visible stand-ins. Otherwise a reply could hide part of a
//! command shown for approval, or pose as the client's own prompts.

use std::borrow::Cow;

/// `text` with every character that can alter the terminal replaced by a visible stand-in;
/// newlines and tabs are kept. Borrowed when there is nothing to replace.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if (c as u32) < 0x20 {
            // C0 controls as their Unicode "control pictures" (ESC → ␛, CR → ␍, BS → ␈).
            out.push(char::from_u32(0x2400 + c as u32).unwrap_or('\u{FFFD}'));
        } else if c == '\u{7f}' {
            out.push('␡');
        } else {
            out.push_str(&format!("<U+{:04X}>", c as u32));
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => true,
        // Bidirectional embeddings, overrides and isolates ("Trojan Source"), and the
        // invisible marks that reorder neighbouring text.
        '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "héllo\tworld\n漢字 🙂 `code` **bold**";
        assert!(matches!(sanitize(s), Cow::Borrowed(t) if t == s));
    }

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        // Clear screen, set the window title, an OSC 8 hyperlink, cursor up.
        let s = "a\x1b[2Jb\x1b]0;pwned\x07c\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\d\x1b[1A";
        let out = sanitize(s);
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
        assert_eq!(out, "a␛[2Jb␛]0;pwned␇c␛]8;;http://x␛\\link␛]8;;␛\\d␛[1A");
    }

    #[test]
    fn a_command_cannot_hide_behind_carriage_return_or_backspace() {
        let cmd = "rm -rf ~ #\rls -la";
        assert_eq!(sanitize(cmd), "rm -rf ~ #␍ls -la");
        assert_eq!(sanitize("ls\x08\x08rm"), "ls␈␈rm");
    }

    #[test]
    fn c1_controls_and_bidi_overrides_are_named() {
        assert_eq!(sanitize("x\u{9b}31my"), "x<U+009B>31my");
        assert_eq!(sanitize("ok \u{202e}txt.exe"), "ok <U+202E>txt.exe");
        assert_eq!(sanitize("\u{2066}a\u{2069}\u{7f}"), "<U+2066>a<U+2069>␡");
    }
}
