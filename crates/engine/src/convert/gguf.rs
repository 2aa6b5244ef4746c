//! `flashmoe convert FILE.gguf DST`: a GGUF model (any part of a split) into a packed model that
//! keeps the GGUF's tensors as they are ([`TensorLayout::Gguf`]): the same GGML block types and
//! the same bytes, nothing requantized or dequantized (F32/F16/BF16 tensors too: the in-place
//! loader widens or reads them at load, and the converted model is loaded by that same code).
//! What changes is where the bytes lie: the non-expert tensors in weights.bin, 4 KiB-aligned and
//! checksummed, and each routed expert's gate, up and down rows (three ranges of the stacked
//! `ffn_*_exps` tensors in the file) one contiguous blob in its layer's expert file, so that
//! streaming reads one range per expert and O_DIRECT works. MTP blocks are left out (the
//! forward pass does not use them). The tokenizer, chat template, BOS/EOS texts and sampling
//! defaults of the metadata become the usual model-folder files.

use super::{
    ConvertOptions, ConvertReport, Ctx, Target, WeightsWriter, check_replaceable, io_err, start_output,
    write_expert_file, write_model,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Layout, MappedTensor};
use crate::models::qwen35::ModelWeights;
use crate::packed::TensorLayout;
use crate::progress::Progress;
use std::path::Path;

pub(super) fn convert_gguf(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport> {
    for (flag, target) in [("--expert-bits", opts.expert), ("--bits", opts.other)] {
        if !matches!(target, Target::Keep | Target::Auto(_)) {
            return Err(Error::input(format!(
                "{flag}: a GGUF is converted with its blocks as they are (no requantization); leave the flag out"
            )));
        }
    }
    check_replaceable(dst, Some(src), opts.force)?;
    let model = GgufModel::open(src)?;
    // The tree the file runs as: building it checks every tensor the converted model will hold
    // (types the kernels compute, sizes, −exp(A_log) < 0) and gives each expert's byte ranges.
    let weights = ModelWeights::load_gguf(&model)?;
    let tokenizer = model.tokenizer()?;
    let config_json = config_json_of(&model.config, src)?;

    let partial = start_output(dst)?;
    progress.start((weights.non_expert_bytes() + weights.expert_bytes()) as u64, "convert");
    let mut ctx = Ctx { rmse: Vec::new(), progress, cancelled: false };

    let mut ww = WeightsWriter::create(&partial)?;
    let wpath = ww.path.clone();
    // Every tensor of the main layers and the globals but the stacked experts, in file order,
    // under its GGUF name with its GGUF type and bytes.
    let mut resident: Vec<&MappedTensor> = model
        .tensors
        .globals
        .iter()
        .chain(model.tensors.layers.iter().flatten())
        .filter(|t| !t.layout.contains(&Layout::StackedExperts))
        .collect();
    resident.sort_by_key(|t| (t.location.part, t.location.start));
    for t in resident {
        let bytes = model.bytes(t.location);
        // Row-major like every manifest shape: the GGUF dims reversed.
        let shape = t.dims.iter().rev().map(|&d| d as usize).collect();
        ww.put(&t.gguf_name, t.ggml_type.name(), shape, bytes.as_slice(), None).map_err(io_err(&wpath))?;
        ctx.advance(bytes.len())?;
    }
    let non_expert_bytes = ww.finish()?;

    let mut expert_files = Vec::with_capacity(weights.layers.len());
    let mut expert_bytes = 0u64;
    for (i, l) in weights.layers.iter().enumerate() {
        progress.message(&format!("layer {}/{}", i + 1, weights.layers.len()));
        let experts = l.moe.experts.resident().ok_or_else(|| Error::input("GGUF experts are views of the file"))?;
        // `Keep` copies each expert's rows of the stacked tensors: its blocks, unchanged.
        let ef = write_expert_file(&partial, i, experts, Target::Keep, opts.group_size, &mut ctx)?;
        expert_bytes += ef.stride * ef.num_experts as u64;
        expert_files.push(ef);
    }

    let mut written = Vec::new();
    let mut write = |name: &str, text: &str| -> Result<()> {
        let path = partial.join(name);
        std::fs::write(&path, text).map_err(io_err(&path))?;
        written.push(name.to_string());
        Ok(())
    };
    write("tokenizer.json", &tokenizer.to_json()?)?;
    if let Some(template) = model.chat_template() {
        write("chat_template.jinja", template)?;
    }
    let special = crate::gguf::special_tokens(&model.parts, &tokenizer);
    if !special.is_empty() {
        write("tokenizer_config.json", &serde_json::to_string_pretty(&special).unwrap())?;
    }
    if let Some(sampling) = crate::gguf::sampling_defaults(&model.parts) {
        write("generation_config.json", &serde_json::to_string_pretty(&sampling).unwrap())?;
    }
    write_model(&partial, dst, src, TensorLayout::Gguf, config_json, ww.entries, expert_files, written)?;
    Ok(ConvertReport { dst: dst.to_path_buf(), non_expert_bytes, expert_bytes, rmse: ctx.rmse })
}

/// The config.json of the converted model: the GGUF's config as HF fields, checked to read back
/// as the same config (the packed model loads its config from this file, the GGUF from its
/// metadata; they must agree for the two to run alike).
fn config_json_of(config: &ModelConfig, src: &Path) -> Result<serde_json::Value> {
    let json = config.to_config_json();
    let back = ModelConfig::from_value(&json, src)?;
    let comparable = |c: &ModelConfig| {
        let mut c = c.clone();
        c.path = Default::default();
        format!("{c:?}")
    };
    if comparable(&back) != comparable(config) {
        return Err(Error::config(
            src,
            format!(
                "its config cannot be written as a config.json that reads back the same (GGUF: {}; config.json: {})",
                comparable(config),
                comparable(&back)
            ),
        ));
    }
    Ok(json)
}
