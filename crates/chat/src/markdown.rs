//! A small streaming markdown → ANSI renderer for the terminal: headings, bullet and numbered
//! lists, block quotes, fenced code blocks, and inline `code`, **bold** and *italic*.
//!
//! Text is rendered as it streams: the start of a line is held only until it is clear whether it
//! is a block marker (`#`, `-`, `1.`, `>`, a code fence), and a run of `*` until the next
//! character; everything else is written at once. Without colour the text passes unchanged.

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const ITALIC: &str = "\x1b[3m";
const UNDERLINE: &str = "\x1b[4m";
const CODE: &str = "\x1b[36m"; // cyan
const MARKER: &str = "\x1b[33m"; // yellow
const HEADING: &str = "\x1b[35m"; // magenta

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Plain,
    Heading(usize),
    Bullet,
    Ordered,
    Quote,
    Fence,
}

/// Streaming renderer; see the module docs.
#[derive(Debug)]
pub struct Markdown {
    color: bool,
    /// Start of the current line, while its block kind is undecided.
    lead: String,
    at_line_start: bool,
    in_fence: bool,
    /// Style of the rest of the line (heading, quote).
    line_style: &'static str,
    line_is_code: bool,
    bold: bool,
    italic: bool,
    code: bool,
    /// `*` seen but not yet interpreted.
    stars: usize,
    /// Whether the last written character was whitespace (or the line start).
    prev_space: bool,
}

impl Markdown {
    pub fn new(color: bool) -> Self {
        Self {
            color,
            lead: String::new(),
            at_line_start: true,
            in_fence: false,
            line_style: "",
            line_is_code: false,
            bold: false,
            italic: false,
            code: false,
            stars: 0,
            prev_space: true,
        }
    }

    /// Renders a complete text.
    pub fn render(text: &str, color: bool) -> String {
        let mut m = Self::new(color);
        let mut s = m.push(text);
        s.push_str(&m.finish());
        s
    }

    /// Feeds more text; returns what can be written now.
    pub fn push(&mut self, text: &str) -> String {
        if !self.color {
            return text.to_string();
        }
        let mut out = String::new();
        for c in text.chars() {
            self.char(c, &mut out);
        }
        out
    }

    /// Flushes everything held back and resets the styles.
    pub fn finish(&mut self) -> String {
        if !self.color {
            return String::new();
        }
        let mut out = String::new();
        if self.at_line_start && !self.lead.is_empty() {
            let lead = std::mem::take(&mut self.lead);
            self.start_line(&lead, true, &mut out);
        }
        self.flush_stars(None, &mut out);
        self.end_line(&mut out, false);
        *self = Self::new(self.color);
        out
    }

    fn char(&mut self, c: char, out: &mut String) {
        if self.at_line_start {
            if c == '\n' {
                let lead = std::mem::take(&mut self.lead);
                self.start_line(&lead, true, out);
                self.end_line(out, true);
                return;
            }
            self.lead.push(c);
            if self.classify(false).is_some() {
                let lead = std::mem::take(&mut self.lead);
                self.start_line(&lead, false, out);
            }
            return;
        }
        if c == '\n' {
            self.flush_stars(None, out);
            self.end_line(out, true);
            return;
        }
        self.inline(c, out);
    }

    /// Block kind of the held line start; `None` while undecided (unless `complete`).
    fn classify(&self, complete: bool) -> Option<(Block, usize)> {
        let t = self.lead.trim_start();
        let indent = self.lead.len() - t.len();
        let undecided = if complete { None } else { Some(()) };
        if t.is_empty() {
            return undecided.map_or(Some((Block::Plain, 0)), |_| None);
        }
        if t.starts_with("```") || t.starts_with("~~~") {
            // The whole fence line is needed (its language).
            return if complete { Some((Block::Fence, t.len() + indent)) } else { None };
        }
        if "```".starts_with(t) || "~~~".starts_with(t) {
            return if complete { Some((Block::Plain, 0)) } else { None };
        }
        if self.in_fence {
            return Some((Block::Plain, 0));
        }
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if hashes > 0 && hashes <= 6 {
            if t.len() == hashes {
                return if complete { Some((Block::Plain, 0)) } else { None };
            }
            if t[hashes..].starts_with(' ') {
                return Some((Block::Heading(hashes), indent + hashes + 1));
            }
            return Some((Block::Plain, 0));
        }
        if matches!(t, "-" | "*" | "+") {
            return if complete { Some((Block::Plain, 0)) } else { None };
        }
        if t.len() >= 2 && matches!(&t[..2], "- " | "* " | "+ ") {
            return Some((Block::Bullet, indent + 2));
        }
        let digits = t.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 && digits <= 9 {
            let rest = &t[digits..];
            if rest.is_empty() || rest == "." || rest == ")" {
                return if complete { Some((Block::Plain, 0)) } else { None };
            }
            if rest.starts_with(". ") || rest.starts_with(") ") {
                return Some((Block::Ordered, indent + digits + 2));
            }
            return Some((Block::Plain, 0));
        }
        if t.starts_with('>') {
            if t == ">" && !complete {
                return None;
            }
            let n = if t.starts_with("> ") { 2 } else { 1 };
            return Some((Block::Quote, indent + n));
        }
        Some((Block::Plain, 0))
    }

    /// Writes the decided line start `lead` and switches to inline rendering.
    fn start_line(&mut self, lead: &str, complete: bool, out: &mut String) {
        self.lead = lead.to_string();
        let (block, marker_len) = self.classify(complete).unwrap_or((Block::Plain, 0));
        self.lead.clear();
        self.at_line_start = false;
        let indent = &lead[..lead.len() - lead.trim_start().len()];
        let rest = &lead[marker_len.min(lead.len())..];
        match block {
            Block::Fence => {
                self.in_fence = !self.in_fence;
                out.push_str(DIM);
                out.push_str(lead);
                out.push_str(RESET);
                self.line_style = "";
                return;
            }
            _ if self.in_fence => {
                self.line_is_code = true;
                out.push_str(CODE);
                out.push_str(lead);
                return;
            }
            Block::Heading(level) => {
                self.line_style = if level == 1 { "\x1b[1;4;35m" } else { "\x1b[1;35m" };
                let _ = (BOLD, UNDERLINE, HEADING);
                out.push_str(indent);
                out.push_str(self.line_style);
            }
            Block::Bullet => {
                out.push_str(indent);
                out.push_str(MARKER);
                out.push_str("• ");
                out.push_str(RESET);
            }
            Block::Ordered => {
                out.push_str(indent);
                out.push_str(MARKER);
                out.push_str(lead[indent.len()..marker_len].trim_end());
                out.push_str(RESET);
                out.push(' ');
            }
            Block::Quote => {
                self.line_style = DIM;
                out.push_str(indent);
                out.push_str(DIM);
                out.push_str("│ ");
            }
            Block::Plain => {
                for c in lead.chars() {
                    self.inline(c, out);
                }
                return;
            }
        }
        self.prev_space = true;
        for c in rest.chars() {
            self.inline(c, out);
        }
    }

    fn end_line(&mut self, out: &mut String, newline: bool) {
        if self.bold || self.italic || self.code || !self.line_style.is_empty() || self.line_is_code {
            out.push_str(RESET);
        }
        if newline {
            out.push('\n');
        }
        self.at_line_start = true;
        self.line_style = "";
        self.line_is_code = false;
        self.bold = false;
        self.italic = false;
        self.code = false;
        self.stars = 0;
        self.prev_space = true;
    }

    fn style(&self, out: &mut String) {
        out.push_str(RESET);
        out.push_str(self.line_style);
        if self.bold {
            out.push_str(BOLD);
        }
        if self.italic {
            out.push_str(ITALIC);
        }
        if self.code {
            out.push_str(CODE);
        }
    }

    fn inline(&mut self, c: char, out: &mut String) {
        if self.line_is_code {
            out.push(c);
            return;
        }
        if self.code {
            if c == '`' {
                self.code = false;
                self.style(out);
            } else {
                out.push(c);
            }
            self.prev_space = false;
            return;
        }
        if c == '*' {
            self.stars += 1;
            return;
        }
        self.flush_stars(Some(c), out);
        if c == '`' {
            self.code = true;
            self.style(out);
        } else {
            out.push(c);
        }
        self.prev_space = c.is_whitespace();
    }

    /// Interprets a run of `*` now that the next character (`None`: end of line) is known.
    fn flush_stars(&mut self, next: Option<char>, out: &mut String) {
        let n = std::mem::take(&mut self.stars);
        if n == 0 {
            return;
        }
        let next_space = next.is_none_or(char::is_whitespace);
        let opens = !next_space;
        let closes = !self.prev_space;
        let mut changed = false;
        let mut literal = 0;
        match n {
            2 if (self.bold && closes) || (!self.bold && opens) => {
                self.bold = !self.bold;
                changed = true;
            }
            1 if (self.italic && closes) || (!self.italic && opens && !self.prev_is_word()) => {
                self.italic = !self.italic;
                changed = true;
            }
            3 if (self.bold && self.italic && closes) || (!self.bold && !self.italic && opens) => {
                self.bold = !self.bold;
                self.italic = !self.italic;
                changed = true;
            }
            _ => literal = n,
        }
        if changed {
            self.style(out);
        }
        for _ in 0..literal {
            out.push('*');
        }
        self.prev_space = false;
    }

    fn prev_is_word(&self) -> bool {
        !self.prev_space
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars().peekable();
        while let Some(c) = it.next() {
            if c == '\x1b' {
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    const DOC: &str = "# Title\n\nSome **bold** and *it* and `code` here, 2 * 3 = 6, a*b.\n\n\
                       - one\n  - nested `x`\n1. first\n10) tenth\n> quoted\n\n```rust\nfn main() { let x = **y; }\n```\n## Sub\nend";

    #[test]
    fn renders_blocks_and_inline() {
        let out = Markdown::render(DOC, true);
        let plain = strip_ansi(&out);
        assert_eq!(
            plain,
            "Title\n\nSome bold and it and code here, 2 * 3 = 6, a*b.\n\n• one\n  • nested x\n1. first\n10) tenth\n│ quoted\n\n\
             ```rust\nfn main() { let x = **y; }\n```\nSub\nend"
        );
        assert!(out.contains("\x1b[1;4;35mTitle"), "{out:?}");
        assert!(out.contains(&format!("{BOLD}bold")), "{out:?}");
        assert!(out.contains(&format!("{ITALIC}it")), "{out:?}");
        assert!(out.contains(&format!("{CODE}code")), "{out:?}");
        assert!(out.contains(&format!("{CODE}fn main() {{ let x = **y; }}")), "{out:?}");
        assert!(out.ends_with("end"), "{out:?}");
    }

    #[test]
    fn streaming_matches_whole() {
        let whole = Markdown::render(DOC, true);
        let mut m = Markdown::new(true);
        let mut out = String::new();
        for c in DOC.chars() {
            out.push_str(&m.push(&c.to_string()));
        }
        out.push_str(&m.finish());
        assert_eq!(strip_ansi(&out), strip_ansi(&whole));
        assert_eq!(out, whole);
    }

    #[test]
    fn writes_early_and_passes_through_without_color() {
        let mut m = Markdown::new(true);
        assert_eq!(m.push("Hello wor"), "Hello wor");
        assert_eq!(m.push("ld\n-"), "ld\n");
        assert!(m.push(" x").contains("• "));
        assert_eq!(Markdown::render(DOC, false), DOC);
    }
}
