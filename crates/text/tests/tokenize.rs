//! Tokenization must match Python `tokenizers` id for id (fixtures from
//! scripts/make_text_fixtures.py), for both the Qwen3.5 and the Qwen3 tokenizer.

mod common;

use common::{load_tokenizer, read_json, scratch_dir};
use flashmoe_text::{TextError, TextTokenizer};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_fixture(name: &str) {
    let tok = load_tokenizer(name);
    let fixture = read_json(&format!("tokenize_{name}.json"));
    assert_eq!(tok.vocab_size() as u64, fixture["vocab_size"].as_u64().unwrap());
    for (token, id) in fixture["special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(token), Some(id.as_u64().unwrap() as u32), "{token}");
        assert_eq!(tok.id_to_token(id.as_u64().unwrap() as u32).as_deref(), Some(token.as_str()));
    }
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            continue;
        }
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids_add_special"]), "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), case["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
    assert!(failures.is_empty(), "{name}: mismatches:\n{}", failures.join("\n"));
}

#[test]
fn qwen35_matches_python() {
    check_fixture("qwen3.5");
}

#[test]
fn qwen3_matches_python() {
    check_fixture("qwen3");
}

#[test]
fn qwen35_known_ids_from_spec() {
    let tok = load_tokenizer("qwen3.5");
    assert_eq!(tok.encode("<|im_start|>assistant\n", false).unwrap(), vec![248045, 74455, 198]);
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(248046));
    assert_eq!(tok.token_to_id("</think>"), Some(248069));
    assert_eq!(tok.stop_token_ids(Some("<|im_end|>")), vec![248044, 248046]);
    assert!(tok.is_special(248046));
    assert!(!tok.is_special(198));
    // The decoded text of a special token is dropped only with skip_special.
    assert_eq!(tok.decode(&[248046], false).unwrap(), "<|im_end|>");
    assert_eq!(tok.decode(&[248046], true).unwrap(), "");
}

/// Streams `ids` one at a time and returns (pieces, concatenation).
fn stream(tok: &TextTokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, String) {
    let mut dec = tok.stream_decoder(skip_special);
    let mut pieces = Vec::new();
    for &id in ids {
        pieces.push(dec.push(id).unwrap());
    }
    pieces.push(dec.finish().unwrap());
    let all = pieces.concat();
    (pieces, all)
}

#[test]
fn stream_decoder_matches_decode() {
    for name in ["qwen3.5", "qwen3"] {
        let tok = load_tokenizer(name);
        let text = "<think>\n思考中…</think>\n\nHi 👋🏽 家族: 👨\u{200d}👩\u{200d}👧\u{200d}👦, 你好世界, こんにちは, 🇯🇵 e\u{301} ok<|im_end|>";
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let (pieces, all) = stream(tok, &ids, skip);
            assert_eq!(all, tok.decode(&ids, skip).unwrap(), "{name} skip={skip}");
            // Every piece is valid text: no replacement characters from split characters.
            for p in &pieces {
                assert!(!p.contains('\u{FFFD}'), "{name}: broken piece {p:?}");
            }
        }
        // Single-token decoding of this text does produce broken characters, so the test above
        // really exercises the hold-back logic.
        let naive: String = ids.iter().map(|&i| tok.decode(&[i], false).unwrap()).collect();
        assert!(naive.contains('\u{FFFD}'), "{name}: expected split characters");
    }
}

#[test]
fn stream_decoder_flushes_incomplete_tail() {
    let tok = load_tokenizer("qwen3.5");
    let ids = tok.encode("a😀", false).unwrap();
    // Drop the last token of the emoji: the tail stays held back until finish().
    let cut = &ids[..ids.len() - 1];
    let mut dec = tok.stream_decoder(false);
    let mut out = String::new();
    for &id in cut {
        out.push_str(&dec.push(id).unwrap());
    }
    assert_eq!(out, "a");
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, tok.decode(cut, false).unwrap());
}

#[test]
fn missing_tokenizer_file() {
    let err = TextTokenizer::load("/nonexistent/dir/tokenizer.json").unwrap_err();
    assert!(matches!(err, TextError::FileNotFound { .. }));
    assert_eq!(err.to_string(), "/nonexistent/dir/tokenizer.json: file not found");
}

#[test]
fn corrupt_tokenizer_file() {
    let dir = scratch_dir("corrupt-tokenizer");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, b"{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"").unwrap();
    let err = TextTokenizer::load(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TextError::InvalidTokenizer { .. }), "{msg}");
    assert!(msg.starts_with(&format!("{}: invalid tokenizer: ", path.display())), "{msg}");

    std::fs::write(&path, b"{\"not\": \"a tokenizer\"}").unwrap();
    assert!(matches!(TextTokenizer::load(&path).unwrap_err(), TextError::InvalidTokenizer { .. }));
    assert!(TextTokenizer::from_bytes(b"\xff\xfe").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
