//! Tokenizer: a thin wrapper over the Hugging Face `tokenizers` crate plus a streaming detokenizer.
//!
//! Using the same library as Python `transformers` (same regex engine, onig) is what makes the ids
//! identical to the reference; this module only adds file-aware errors and incremental decoding.

use std::path::Path;

use crate::error::{Result, TextError, read_file};

/// A loaded `tokenizer.json` (byte-level BPE for the Qwen family, but any HF tokenizer works).
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Highest id known to the model vocabulary or the added tokens, plus one. Cached because
    /// computing it walks the whole 248k-entry vocabulary.
    vocab_size: usize,
    /// Ids of special added tokens, cached for [`TextTokenizer::is_special`].
    special_ids: std::collections::HashSet<u32>,
    /// The special tokens' strings, longest first (so the longest match wins), for
    /// [`TextTokenizer::mark_content`] and [`TextTokenizer::encode_chat_prompt`].
    special_strings: Vec<(String, u32)>,
    /// Which bytes start a special token's string, and the longest string's length: most
    /// positions of a text are ruled out without comparing strings.
    special_first_bytes: [bool; 256],
    longest_special: usize,
    /// A copy of `inner` that encodes special-token strings as plain text (`tokenizers`'
    /// `encode_special_tokens`, Python's `split_special_tokens=True`); built when first needed.
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
}

/// Put by [`TextTokenizer::mark_content`] before a special token's string in message content, so
/// that [`TextTokenizer::encode_chat_prompt`] can tell it from the template's own markup after
/// rendering. A Unicode noncharacter (U+FDD0, reserved for internal use): in the content it is
/// replaced by U+FFFD, so a client cannot place one itself.
pub const CONTENT_MARK: char = '\u{FDD0}';

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab_size", &self.vocab_size).finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` file. Errors name the file: missing file → `…: file not found`,
    /// malformed content → `…: invalid tokenizer: <parser message>`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::from_bytes_named(&bytes, &path.display().to_string())
    }

    /// Builds a tokenizer from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_bytes_named(bytes, "<tokenizer bytes>")
    }

    /// This tokenizer as the text of a `tokenizer.json` ([`TextTokenizer::from_bytes`] reads it
    /// back): how a tokenizer assembled from a GGUF vocabulary is saved with a converted model.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| TextError::Tokenizer(format!("cannot serialize: {e}")))
    }

    fn from_bytes_named(bytes: &[u8], origin: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TextError::InvalidTokenizer { origin: origin.to_string(), message: e.to_string() })?;
        Ok(Self::from_inner(inner))
    }

    /// Wraps a built `tokenizers::Tokenizer` (from a file, or assembled from a GGUF vocabulary).
    pub(crate) fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        // `get_vocab_size(true)` adds the two counts, which overcounts when added tokens are also in
        // the model vocabulary; the embedding-relevant number is the highest id + 1.
        let vocab_size = inner.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
        let specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| (id, t.content))
            .collect();
        let special_ids = specials.iter().map(|(id, _)| *id).collect();
        let mut special_strings: Vec<(String, u32)> = specials.into_iter().map(|(id, s)| (s, id)).collect();
        special_strings.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        let mut special_first_bytes = [false; 256];
        for (t, _) in &special_strings {
            special_first_bytes[t.as_bytes()[0] as usize] = true;
        }
        let longest_special = special_strings.first().map_or(0, |(t, _)| t.len());
        Self {
            inner,
            vocab_size,
            special_ids,
            special_strings,
            special_first_bytes,
            longest_special,
            plain: std::sync::OnceLock::new(),
        }
    }

    /// Encodes text. Special/added tokens written in the text (e.g. `<|im_start|>`) are matched as
    /// single tokens, as HF does by default. `add_special` adds the post-processor's tokens (a BOS
    /// for some models; none for Qwen).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        // encode_fast skips offset tracking, which we never use.
        let enc = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| TextError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Message content made safe to render into a chat template: every special token's string in
    /// it (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>` …) and a trailing start of one (`<|im_`,
    /// which the template or the next string could complete) get a [`CONTENT_MARK`] before them,
    /// so that [`TextTokenizer::encode_chat_prompt`] encodes them as plain text. Marks already in
    /// the text become U+FFFD. Text without special-token strings comes back unchanged.
    pub fn mark_content(&self, text: &str) -> String {
        if self.special_strings.is_empty() {
            return text.replace(CONTENT_MARK, "\u{FFFD}");
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if let Some((t, _)) = self.special_at(rest) {
                out.push(CONTENT_MARK);
                out.push_str(t);
                rest = &rest[t.len()..];
                continue;
            }
            if rest.len() < self.longest_special
                && self.special_first_bytes[rest.as_bytes()[0] as usize]
                && self.special_strings.iter().any(|(t, _)| t.len() > rest.len() && t.starts_with(rest))
            {
                out.push(CONTENT_MARK);
                out.push_str(rest);
                break;
            }
            out.push(if c == CONTENT_MARK { '\u{FFFD}' } else { c });
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// The special token whose string starts `text` (the longest), if any.
    fn special_at(&self, text: &str) -> Option<(&str, u32)> {
        if !text.as_bytes().first().is_some_and(|&b| self.special_first_bytes[b as usize]) {
            return None;
        }
        self.special_strings.iter().find(|(t, _)| text.starts_with(t.as_str())).map(|(t, id)| (t.as_str(), *id))
    }

    /// Encodes a chat prompt rendered from [marked](TextTokenizer::mark_content) content: the
    /// special tokens the template wrote are control tokens, those a [`CONTENT_MARK`] precedes
    /// (they came from content) are encoded as plain text, as Python's
    /// `tokenizer(text, split_special_tokens=True)` encodes them, and the marks are dropped. The
    /// text between the template's special tokens is encoded as one piece, exactly as
    /// [`TextTokenizer::encode`] would; a prompt with no mark encodes exactly as `encode` does.
    pub fn encode_chat_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if !text.contains(CONTENT_MARK) {
            return self.encode(text, false);
        }
        let mut ids = Vec::new();
        // Text between two of the template's special tokens, and whether content put a
        // special-token string in it.
        let mut run = String::new();
        let mut run_has_forged = false;
        let mut marked = false;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if c == CONTENT_MARK {
                marked = true;
                rest = &rest[c.len_utf8()..];
                continue;
            }
            if let Some((t, id)) = self.special_at(rest) {
                if marked {
                    run.push_str(t);
                    run_has_forged = true;
                } else {
                    self.encode_run(&run, run_has_forged, &mut ids)?;
                    run.clear();
                    run_has_forged = false;
                    ids.push(id);
                }
                rest = &rest[t.len()..];
            } else {
                run.push(c);
                rest = &rest[c.len_utf8()..];
            }
            marked = false;
        }
        self.encode_run(&run, run_has_forged, &mut ids)?;
        Ok(ids)
    }

    fn encode_run(&self, run: &str, plain: bool, ids: &mut Vec<u32>) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let tokenizer = if plain {
            self.plain.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        } else {
            &self.inner
        };
        let enc =
            tokenizer.encode_fast(run, false).map_err(|e| TextError::Tokenizer(format!("encoding failed: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Decodes ids to text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
    /// Ids outside the vocabulary are skipped, as HF does.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| TextError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Number of ids, added tokens included (highest id + 1). This can be smaller than the model's
    /// embedding rows, which are padded (248,320 for Qwen3.5).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of a token string (model vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id (in the model's byte-level alphabet, e.g. `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special added token (those `decode(.., true)` skips).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids that end generation: `<|im_end|>` (end of turn) and `<|endoftext|>` when the
    /// vocabulary has them (Qwen stops on both), plus `eos_token` (e.g.
    /// [`ChatTemplate::eos_token`](crate::ChatTemplate::eos_token)) when given. Sorted, no duplicates.
    pub fn stop_token_ids(&self, eos_token: Option<&str>) -> Vec<u32> {
        let mut ids: Vec<u32> =
            ["<|im_end|>", "<|endoftext|>"].into_iter().chain(eos_token).filter_map(|t| self.token_to_id(t)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Borrow the underlying `tokenizers::Tokenizer` for anything not wrapped here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Starts a streaming detokenizer over this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special)
    }
}

/// Incremental detokenizer for generated ids.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 2–4 tokens),
/// so decoding one token at a time would print U+FFFD. This keeps a small window of recent ids,
/// decodes the window, and only emits text once it no longer ends in an incomplete character
/// (which the decoder shows as a trailing U+FFFD). Decoding a window instead of single tokens also
/// keeps decoders that depend on the neighbours (e.g. SentencePiece's leading-space rule) correct.
///
/// The concatenation of everything returned by [`push`](Self::push) and [`finish`](Self::finish)
/// equals `decode(all_ids, skip_special)` for byte-level tokenizers.
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window that is re-decoded as context (already emitted).
    prefix_offset: usize,
    /// End of the part already emitted.
    read_offset: usize,
}

impl<'a> StreamDecoder<'a> {
    /// New decoder; `skip_special` as in [`TextTokenizer::decode`].
    pub fn new(tokenizer: &'a TextTokenizer, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Feeds one generated id; returns the newly completed text (possibly empty when the id ends
    /// in the middle of a character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // The decoded window normally extends the decoded prefix; if a decoder rewrote the
            // boundary, fall back to emitting from the first differing char boundary.
            let cut = if full.starts_with(&prefix) { prefix.len() } else { common_prefix_len(&prefix, &full) };
            let out = full[cut..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Flushes what is held back (an incomplete character at the end of generation is emitted as
    /// U+FFFD, exactly as `decode` would).
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        let cut = if full.starts_with(&prefix) { prefix.len() } else { common_prefix_len(&prefix, &full) };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full[cut..].to_string())
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Length in bytes of the common prefix of `a` and `b`, on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, ca), cb)| ca != cb).map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}
