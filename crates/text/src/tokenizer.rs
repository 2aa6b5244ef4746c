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
}

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
        let special_ids =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        Self { inner, vocab_size, special_ids }
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
