//! `flashmoe logits`: the logits the model gives for a list of token ids.

use crate::args::{self, DeviceArgs, EngineArgs, ModelDir, Plan, StoreArgs};
use crate::util::print_device;
use anyhow::{Result, anyhow, bail};
use clap::Args;
use flashmoe::{LogitsFor, Model};
use flashmoe_text::TextTokenizer;
use serde_json::json;
use std::io::{BufWriter, Write};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelDir,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    /// Feed the ids one at a time through the caches instead of one batched prefill.
    #[arg(long)]
    decode: bool,
    /// Print {"ids": [...], "logits": [[...], ...]} (otherwise a short human-readable summary).
    #[arg(long)]
    json: bool,
    /// Show token strings (the model's tokenizer.json): next to each id and top token, and in
    /// --json as "tokens" (the input ids').
    #[arg(long)]
    show_text: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u32>().map_err(|_| anyhow!("--ids: `{x}` is not a token id (non-negative integer)")))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    Ok(ids)
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let ids = parse_ids(&a.ids)?;
    let dir = &a.model.dir()?;
    let plan = Plan {
        context_tokens: ids.len(),
        batch_tokens: if a.decode { 1 } else { ids.len() },
        logits_rows: ids.len(),
        sequences: 1,
    };
    let opts = args::load_options(dir, &a.store, &a.device, &a.engine, plan)?;
    let model = Model::load_with(dir, &opts)?;
    print_device(&model);
    let v = model.config.vocab_size;
    let mut state = model.new_state();
    let rows = if a.decode {
        let mut all = Vec::with_capacity(ids.len() * v);
        for &id in &ids {
            all.extend(model.forward(&[id], &mut state, LogitsFor::Last)?);
        }
        all
    } else {
        model.forward(&ids, &mut state, LogitsFor::All)?
    };
    let tokenizer = if a.show_text { Some(TextTokenizer::load(dir.join("tokenizer.json"))?) } else { None };
    let text = |id: u32| match &tokenizer {
        Some(t) => format!(" {:?}", t.id_to_token(id).unwrap_or_default()),
        None => String::new(),
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if a.json {
        let logits: Vec<&[f32]> = rows.chunks(v).collect();
        let mut doc = json!({"ids": ids, "logits": logits});
        if let Some(t) = &tokenizer {
            doc["tokens"] = json!(crate::commands::tokenize::token_strings(t, &ids));
        }
        serde_json::to_writer(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        for (i, row) in rows.chunks(v).enumerate() {
            let mut top: Vec<usize> = (0..v).collect();
            top.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            let best: Vec<String> =
                top[..5.min(v)].iter().map(|&t| format!("{t}{}:{:.4}", text(t as u32), row[t])).collect();
            writeln!(out, "pos {i} id {}{}: top {}", ids[i], text(ids[i]), best.join(" "))?;
        }
    }
    out.flush()?;
    Ok(())
}
