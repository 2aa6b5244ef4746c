//! `flashmoe tokenize`: token ids of a text, or a chat request rendered by the model's template.

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use flashmoe_text::{ChatTemplate, TextTokenizer};
use serde_json::Value as Json;
use std::io::Read;
use std::path::PathBuf;

#[derive(Args)]
pub struct TokenizeArgs {
    /// Model whose tokenizer (and chat template) to use: a folder, `builtin` or a Hub repo
    /// OWNER/NAME[@REVISION] from the Hugging Face cache.
    #[arg(long, conflicts_with = "tokenizer", required_unless_present = "tokenizer")]
    model: Option<String>,
    /// A tokenizer.json file.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Print a JSON array of ids (with --show-text: {"ids": [...], "tokens": [...]}).
    #[arg(long)]
    json: bool,
    /// Show each token's vocabulary string next to its id (as HF tokenizers' `Encoding.tokens`;
    /// byte-level BPE writes a leading space as `Ġ`).
    #[arg(long)]
    show_text: bool,
    /// Read an OpenAI-style {"messages": [...], "tools": [...]} from stdin and print the prompt
    /// rendered by the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Render with enable_thinking=false (with --chat).
    #[arg(long)]
    no_think: bool,
    /// Text to tokenize.
    #[arg(required_unless_present = "chat")]
    text: Option<String>,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let model_dir = a.model.as_deref().map(crate::args::model::resolve).transpose()?.map(|r| r.path);
    let tok_path = match (&model_dir, &a.tokenizer) {
        (Some(m), _) => m.join("tokenizer.json"),
        (None, Some(t)) => t.clone(),
        (None, None) => bail!("give --model DIR or --tokenizer FILE"),
    };
    if a.chat {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("reading the chat request from stdin")?;
        let req: Json = serde_json::from_str(&input).map_err(|e| anyhow!("stdin: malformed JSON: {e}"))?;
        let messages = req.get("messages").ok_or_else(|| anyhow!("stdin: missing field `messages`"))?;
        let template = match &model_dir {
            Some(m) => ChatTemplate::from_model_dir(m)?,
            None => {
                let cfg = tok_path.with_file_name("tokenizer_config.json");
                match ChatTemplate::from_tokenizer_config(&cfg) {
                    Ok(Some(t)) => t,
                    _ => ChatTemplate::chatml(),
                }
            }
        };
        let thinking =
            req.get("enable_thinking").and_then(Json::as_bool).or(if a.no_think { Some(false) } else { None });
        let add_gen = req.get("add_generation_prompt").and_then(Json::as_bool).unwrap_or(true);
        if a.json {
            // As the server tokenizes a chat: special-token strings in content are plain text.
            let tok = TextTokenizer::load(&tok_path)?;
            let ids = template.encode_chat(&tok, messages, req.get("tools"), add_gen, thinking, None)?;
            println!("{}", serde_json::to_string(&ids)?);
        } else {
            print!("{}", template.render(messages, req.get("tools"), add_gen, thinking, None)?);
        }
        return Ok(());
    }
    let tok = TextTokenizer::load(&tok_path)?;
    let ids = tok.encode(a.text.as_deref().unwrap_or_default(), false)?;
    if a.show_text {
        let tokens = token_strings(&tok, &ids);
        if a.json {
            println!("{}", serde_json::json!({"ids": ids, "tokens": tokens}));
        } else {
            for (id, t) in ids.iter().zip(&tokens) {
                println!("{id}\t{t}");
            }
        }
    } else if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

/// The vocabulary string of each id (empty for an id the vocabulary lacks).
pub fn token_strings(tok: &TextTokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&id| tok.id_to_token(id).unwrap_or_default()).collect()
}
