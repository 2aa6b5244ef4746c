//! A byte-level BPE tokenizer assembled from the vocabulary a GGUF file carries
//! (`tokenizer.ggml.model` = `gpt2`): the token list, token types and merges as llama.cpp's
//! converter writes them (`_set_vocab_gpt2`), and the pre-tokenizer named by
//! `tokenizer.ggml.pre`. The result is built with the `tokenizers` library's own components, so
//! it encodes like the model's `tokenizer.json` (the test checks ids against it).

use crate::error::{Result, TextError};
use crate::tokenizer::TextTokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// The split regex of each `tokenizer.ggml.pre` we know, copied from the `tokenizer.json` of the
/// models that define it, and whether that tokenizer.json sets BPE `ignore_merges`.
fn pre_tokenizer(pre: &str) -> Option<(&'static str, bool)> {
    Some(match pre {
        // Qwen3.5: letters include combining marks (\p{M}).
        "qwen35" => (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            true,
        ),
        // Qwen2 / Qwen3 / Qwen3-Next.
        "qwen2" => (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            false,
        ),
        _ => return None,
    })
}

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The vocabulary of a GGUF file.
pub struct GgufVocab<'a> {
    /// `tokenizer.ggml.tokens`: the token of each id, in the byte-level alphabet.
    pub tokens: &'a [String],
    /// `tokenizer.ggml.token_type`, one per token (absent: all normal).
    pub token_types: Option<&'a [i32]>,
    /// `tokenizer.ggml.merges`: "left right" pairs, highest priority first.
    pub merges: &'a [String],
    /// `tokenizer.ggml.pre`.
    pub pre: &'a str,
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF vocabulary describes. `origin` names the file in errors.
    /// Normal tokens form the BPE vocabulary; control tokens become special added tokens and
    /// user-defined ones plain added tokens (both matched verbatim before BPE, as in HF);
    /// unused tokens (the converter's `[PADn]` fill) are left out.
    pub fn from_gguf_vocab(v: &GgufVocab, origin: &str) -> Result<Self> {
        let bad = |message: String| TextError::InvalidTokenizer { origin: origin.to_string(), message };
        let (regex, ignore_merges) = pre_tokenizer(v.pre)
            .ok_or_else(|| bad(format!("pre-tokenizer `{}` is not supported (supported: qwen35, qwen2)", v.pre)))?;
        if let Some(types) = v.token_types
            && types.len() != v.tokens.len()
        {
            return Err(bad(format!("{} token types for {} tokens", types.len(), v.tokens.len())));
        }
        // Added tokens go into the BPE vocabulary too, so that `add_tokens` finds them there and
        // keeps their GGUF ids even across gaps of unused ids. BPE never sees them whole: added
        // tokens are split out of the text before the model runs.
        let mut vocab = Vocab::default();
        vocab.reserve(v.tokens.len());
        let mut added = Vec::new();
        for (id, token) in v.tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| bad("more than 2^32 tokens".into()))?;
            match v.token_types.map_or(TOKEN_NORMAL, |t| t[id as usize]) {
                TOKEN_UNUSED => continue,
                TOKEN_CONTROL => added.push((id, AddedToken::from(token.clone(), true).normalized(false))),
                TOKEN_USER_DEFINED => added.push((id, AddedToken::from(token.clone(), false).normalized(false))),
                _ => {}
            }
            if vocab.insert(token.clone(), id).is_some() {
                return Err(bad(format!("token {token:?} appears twice in the vocabulary")));
            }
        }
        let merges = v
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merge {m:?} is not two tokens separated by a space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(format!("BPE: {e}")))?;
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_normalizer(Some(NFC));
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // `add_tokens` reuses the model vocabulary's id of a known content; check it did.
        for (id, token) in added {
            let content = token.content.clone();
            let special = token.special;
            if special {
                inner.add_special_tokens(&[token]);
            } else {
                inner.add_tokens(&[token]);
            }
            let got = inner.token_to_id(&content);
            if got != Some(id) {
                return Err(bad(format!("added token {content:?} should have id {id} but got {got:?}")));
            }
        }
        Ok(TextTokenizer::from_inner(inner))
    }
}
