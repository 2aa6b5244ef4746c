//! `flashmoe convert`: any checkpoint the engine reads (HF f32/bf16/f16, MLX affine, packed) →
//! a packed model directory; a GGUF file keeps its GGML blocks as they are (`gguf`). Written
//! under `DST.partial` and renamed to DST only when complete (manifest last), so an interrupted
//! run never leaves a directory that looks finished, and re-running simply starts over.

mod gguf;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::ExpertWeights;
use crate::models::qwen35::{Mixer, ModelWeights};
use crate::packed::quant::{dequantize_row, quantize_row};
use crate::packed::*;
use crate::progress::Progress;
use crate::weights::Linear;
use flashmoe_kernels::{FloatType, MatData};
use half::bf16;
use rayon::prelude::*;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What to store a group of matrices as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Exactly the source bytes.
    Keep,
    /// Keep affine-quantized sources; quantize float sources to this many bits.
    Auto(u32),
    Float(FloatType),
    Affine(u32),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "keep" => Target::Keep,
            "f32" => Target::Float(FloatType::F32),
            "bf16" => Target::Float(FloatType::BF16),
            "f16" => Target::Float(FloatType::F16),
            "2" => Target::Affine(2),
            "4" => Target::Affine(4),
            "8" => Target::Affine(8),
            other => {
                return Err(format!("`{other}`: expected 2, 4, 8, bf16, f16, f32 or keep"));
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub expert: Target,
    pub other: Target,
    /// Group size for newly quantized matrices (default 64).
    pub group_size: usize,
    /// Replace an existing destination.
    pub force: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { expert: Target::Auto(4), other: Target::Auto(8), group_size: 64, force: false }
    }
}

/// Root-mean-square error that requantization added to one projection of one layer.
#[derive(Clone, Debug)]
pub struct RmseRow {
    pub layer: Option<usize>,
    pub projection: String,
    pub from: String,
    pub to: String,
    pub rmse: f64,
    /// RMS of the source values, for scale.
    pub rms: f64,
}

#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub dst: PathBuf,
    pub non_expert_bytes: u64,
    pub expert_bytes: u64,
    pub rmse: Vec<RmseRow>,
}

struct Component {
    suffix: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

struct Encoded {
    comps: Vec<Component>,
    quant: Option<QuantInfo>,
    desc_from: String,
    desc_to: String,
    /// Σ (new − source)² and Σ source² over all elements, when requantized.
    err: Option<(f64, f64, usize)>,
}

fn ft_name(t: FloatType) -> &'static str {
    match t {
        FloatType::F32 => "F32",
        FloatType::BF16 => "BF16",
        FloatType::F16 => "F16",
    }
}

fn describe(m: &MatData) -> String {
    match m {
        MatData::Float { dtype, .. } => ft_name(*dtype).to_lowercase(),
        MatData::Affine { bits, group_size, .. } => format!("{bits}-bit/g{group_size}"),
        MatData::Ggml { ty, .. } => ty.name().to_string(),
    }
}

fn encode(lin: &Linear, target: Target, group: usize) -> Result<Encoded> {
    let mats = lin.mats();
    let (rows, cols) = (lin.rows(), lin.cols());
    let from = describe(&mats[0].data);
    let source_affine = match mats[0].data {
        MatData::Affine { bits, group_size, .. } => Some((bits, group_size)),
        MatData::Float { .. } | MatData::Ggml { .. } => None,
    };
    let same_format = mats.iter().all(|m| describe(&m.data) == from);
    let target = match target {
        Target::Auto(b) => match source_affine {
            Some(_) => Target::Keep,
            None => Target::Affine(b),
        },
        t => t,
    };
    let target = match target {
        Target::Affine(b) if source_affine == Some((b, group)) => Target::Keep,
        // MLX quantizes only matrices whose input size is a multiple of the group size.
        Target::Affine(_) if !cols.is_multiple_of(group) => match source_affine {
            Some(_) => Target::Float(FloatType::BF16),
            None => Target::Keep,
        },
        t => t,
    };
    let target = if target == Target::Keep && !same_format { Target::Float(FloatType::F32) } else { target };
    match target {
        Target::Keep => {
            let mut comps = Vec::new();
            let quant = match mats[0].data {
                MatData::Float { dtype, .. } => {
                    let mut bytes = Vec::new();
                    for m in &mats {
                        if let MatData::Float { data, .. } = m.data {
                            bytes.extend_from_slice(data);
                        }
                    }
                    comps.push(Component { suffix: "weight", dtype: ft_name(dtype), shape: vec![rows, cols], bytes });
                    None
                }
                MatData::Affine { bits, group_size, sb_dtype, .. } => {
                    let (mut w, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
                    for m in &mats {
                        if let MatData::Affine { weight, scales, biases, .. } = m.data {
                            w.extend_from_slice(weight);
                            s.extend_from_slice(scales);
                            b.extend_from_slice(biases);
                        }
                    }
                    let packed = cols * bits as usize / 32;
                    comps.push(Component { suffix: "weight", dtype: "U32", shape: vec![rows, packed], bytes: w });
                    comps.push(Component {
                        suffix: "scales",
                        dtype: ft_name(sb_dtype),
                        shape: vec![rows, cols / group_size],
                        bytes: s,
                    });
                    comps.push(Component {
                        suffix: "biases",
                        dtype: ft_name(sb_dtype),
                        shape: vec![rows, cols / group_size],
                        bytes: b,
                    });
                    Some(QuantInfo { bits, group_size })
                }
                MatData::Ggml { ty, .. } => {
                    // The blocks as they are (a GGUF expert): row-major [rows, cols] of `ty`.
                    let mut bytes = Vec::new();
                    for m in &mats {
                        if let MatData::Ggml { data, .. } = m.data {
                            bytes.extend_from_slice(data);
                        }
                    }
                    comps.push(Component { suffix: "weight", dtype: ty.name(), shape: vec![rows, cols], bytes });
                    None
                }
            };
            Ok(Encoded { comps, quant, desc_to: from.clone(), desc_from: from, err: None })
        }
        Target::Float(ft) => {
            let mut bytes = Vec::with_capacity(rows * cols * ft.size());
            let mut row = vec![0.0f32; cols];
            for_each_row(&mats, &mut row, |r| {
                for &v in r {
                    match ft {
                        FloatType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                        FloatType::BF16 => bytes.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                        FloatType::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    }
                }
            });
            Ok(Encoded {
                comps: vec![Component { suffix: "weight", dtype: ft_name(ft), shape: vec![rows, cols], bytes }],
                quant: None,
                desc_to: ft_name(ft).to_lowercase(),
                desc_from: from,
                err: None,
            })
        }
        Target::Affine(bits) => {
            let words = cols * bits as usize / 32;
            let groups = cols / group;
            let (mut w, mut s, mut b) = (
                Vec::with_capacity(rows * words * 4),
                Vec::with_capacity(rows * groups * 2),
                Vec::with_capacity(rows * groups * 2),
            );
            let mut codes = vec![0u32; words];
            let mut sc = vec![bf16::ZERO; groups];
            let mut bi = vec![bf16::ZERO; groups];
            let mut back = vec![0.0f32; cols];
            let (mut se, mut ss) = (0.0f64, 0.0f64);
            let mut row = vec![0.0f32; cols];
            for_each_row(&mats, &mut row, |r| {
                quantize_row(r, bits, group, &mut codes, &mut sc, &mut bi);
                dequantize_row(&codes, &sc, &bi, bits, group, &mut back);
                for (&x, &y) in r.iter().zip(&back) {
                    se += ((x - y) as f64).powi(2);
                    ss += (x as f64).powi(2);
                }
                w.extend(codes.iter().flat_map(|c| c.to_le_bytes()));
                s.extend(sc.iter().flat_map(|c| c.to_le_bytes()));
                b.extend(bi.iter().flat_map(|c| c.to_le_bytes()));
            });
            Ok(Encoded {
                comps: vec![
                    Component { suffix: "weight", dtype: "U32", shape: vec![rows, words], bytes: w },
                    Component { suffix: "scales", dtype: "BF16", shape: vec![rows, groups], bytes: s },
                    Component { suffix: "biases", dtype: "BF16", shape: vec![rows, groups], bytes: b },
                ],
                quant: Some(QuantInfo { bits, group_size: group }),
                desc_to: format!("{bits}-bit/g{group}"),
                desc_from: from,
                err: Some((se, ss, rows * cols)),
            })
        }
        Target::Auto(_) => unreachable!("resolved above"),
    }
}

fn for_each_row(mats: &[flashmoe_kernels::MatRef], row: &mut [f32], mut f: impl FnMut(&[f32])) {
    for m in mats {
        for r in 0..m.rows {
            flashmoe_kernels::dequant_row(m, r, row);
            f(row);
        }
    }
}

struct WeightsWriter {
    file: BufWriter<std::fs::File>,
    path: PathBuf,
    pos: u64,
    entries: Vec<TensorEntry>,
}

impl WeightsWriter {
    /// An empty weights.bin in the output folder `partial`.
    fn create(partial: &Path) -> Result<Self> {
        let path = partial.join(WEIGHTS_FILE);
        let f = std::fs::File::create(&path).map_err(|e| Error::file(&path, format!("cannot create: {e}")))?;
        Ok(WeightsWriter { file: BufWriter::with_capacity(1 << 22, f), path, pos: 0, entries: Vec::new() })
    }

    /// Flushes and syncs the file; returns its length (the model's non-expert bytes).
    fn finish(&mut self) -> Result<u64> {
        self.file.flush().map_err(io_err(&self.path))?;
        self.file.get_ref().sync_all().map_err(io_err(&self.path))?;
        Ok(self.pos)
    }

    fn pad_to(&mut self, align: u64) -> std::io::Result<()> {
        let target = align_up(self.pos, align);
        let zeros = vec![0u8; (target - self.pos) as usize];
        self.file.write_all(&zeros)?;
        self.pos = target;
        Ok(())
    }
    fn put(
        &mut self,
        name: &str,
        dtype: &str,
        shape: Vec<usize>,
        bytes: &[u8],
        quant: Option<QuantInfo>,
    ) -> std::io::Result<()> {
        self.pad_to(ALIGN as u64)?;
        self.file.write_all(bytes)?;
        self.entries.push(TensorEntry {
            name: name.to_string(),
            dtype: dtype.to_string(),
            shape,
            offset: self.pos,
            nbytes: bytes.len() as u64,
            quant,
            xxh3: Some(xxh3_hex(bytes)),
        });
        self.pos += bytes.len() as u64;
        Ok(())
    }
    fn put_vec(&mut self, name: &str, v: &[f32], shape: Vec<usize>) -> std::io::Result<()> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(name, "F32", shape, &bytes, None)
    }
}

struct Ctx<'a> {
    rmse: Vec<RmseRow>,
    progress: &'a dyn Progress,
    cancelled: bool,
}

impl Ctx<'_> {
    fn record(&mut self, layer: Option<usize>, projection: &str, e: &Encoded) {
        if let Some((se, ss, n)) = e.err {
            self.rmse.push(RmseRow {
                layer,
                projection: projection.to_string(),
                from: e.desc_from.clone(),
                to: e.desc_to.clone(),
                rmse: (se / n as f64).sqrt(),
                rms: (ss / n as f64).sqrt(),
            });
        }
    }
    fn advance(&mut self, bytes: usize) -> Result<()> {
        if !self.progress.inc(bytes as u64) {
            self.cancelled = true;
            return Err(Error::input("conversion cancelled"));
        }
        Ok(())
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::file(path, format!("write failed: {e}"))
}

/// Converts `src` into a packed model at `dst`. `progress` hears the source bytes as they are
/// written (one phase, labelled `convert`), a `layer i/N` message as each layer starts, and may
/// cancel (the partial output stays behind under its `.partial` name; `dst` is untouched).
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertReport> {
    let result = convert_inner(src, dst, opts, progress);
    progress.finish();
    result
}

fn convert_inner(src: &Path, dst: &Path, opts: &ConvertOptions, progress: &dyn Progress) -> Result<ConvertReport> {
    if !src.exists() {
        return Err(Error::NotFound(src.to_path_buf()));
    }
    if crate::gguf::is_gguf(src) {
        return gguf::convert_gguf(src, dst, opts, progress);
    }
    check_replaceable(dst, Some(src), opts.force)?;
    if ![32, 64, 128].contains(&opts.group_size) {
        return Err(Error::input(format!("--group-size {}: must be 32, 64 or 128", opts.group_size)));
    }
    let config = ModelConfig::load(src)?;
    let store = crate::packed::open_any(src)?;
    let weights = ModelWeights::load(&store, &config)?;
    let config_path = src.join("config.json");
    let mut config_json: serde_json::Value =
        serde_json::from_str(&flashmoe_text::file::read_text(&config_path).map_err(|e| Error::io(&config_path, e))?)
            .map_err(|e| Error::file(&config_path, format!("malformed JSON: {e}")))?;
    if let Some(o) = config_json.as_object_mut() {
        // Quantization is described per tensor in the manifest; the source's module-path
        // overrides no longer apply to canonical names.
        o.remove("quantization");
        o.remove("quantization_config");
    }

    let partial = start_output(dst)?;
    progress.start((weights.non_expert_bytes() + weights.expert_bytes()) as u64, "convert");

    let mut ctx = Ctx { rmse: Vec::new(), progress, cancelled: false };
    let mut ww = WeightsWriter::create(&partial)?;
    let wpath = ww.path.clone();
    let group = opts.group_size;
    let c = &config;

    let put_linear = |ww: &mut WeightsWriter,
                      ctx: &mut Ctx,
                      layer: Option<usize>,
                      base: &str,
                      proj: &str,
                      lin: &Linear,
                      target: Target|
     -> Result<()> {
        let e = encode(lin, target, group)?;
        ctx.record(layer, proj, &e);
        for comp in &e.comps {
            ww.put(
                &format!("{base}.{}", comp.suffix),
                comp.dtype,
                comp.shape.clone(),
                &comp.bytes,
                if comp.suffix == "weight" { e.quant.clone() } else { None },
            )
            .map_err(io_err(&wpath))?;
        }
        ctx.advance(lin.bytes())
    };
    // Routers and the shared-expert gate decide which experts run: never below 8 bits.
    let gate_target = |t: Target| match t {
        Target::Affine(b) if b < 8 => Target::Affine(8),
        Target::Auto(b) if b < 8 => Target::Auto(8),
        t => t,
    };

    put_linear(&mut ww, &mut ctx, None, "model.embed_tokens", "embed_tokens", &weights.embed, opts.other)?;
    if !c.tie_word_embeddings {
        put_linear(&mut ww, &mut ctx, None, "lm_head", "lm_head", &weights.lm_head, opts.other)?;
    }
    ww.put_vec("model.norm.weight", &weights.final_norm, vec![c.hidden_size]).map_err(io_err(&wpath))?;
    let mut expert_files = Vec::new();
    let mut expert_bytes = 0u64;
    for (i, l) in weights.layers.iter().enumerate() {
        progress.message(&format!("layer {}/{}", i + 1, weights.layers.len()));
        let p = format!("model.layers.{i}.");
        ww.put_vec(&format!("{p}input_layernorm.weight"), &l.input_norm, vec![c.hidden_size])
            .map_err(io_err(&wpath))?;
        ww.put_vec(&format!("{p}post_attention_layernorm.weight"), &l.post_attention_norm, vec![c.hidden_size])
            .map_err(io_err(&wpath))?;
        match &l.mixer {
            Mixer::Attention(a) => {
                for (n, lin) in
                    [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)]
                {
                    put_linear(
                        &mut ww,
                        &mut ctx,
                        Some(i),
                        &format!("{p}self_attn.{n}"),
                        &format!("self_attn.{n}"),
                        lin,
                        opts.other,
                    )?;
                }
                ww.put_vec(&format!("{p}self_attn.q_norm.weight"), &a.q_norm, vec![c.head_dim])
                    .map_err(io_err(&wpath))?;
                ww.put_vec(&format!("{p}self_attn.k_norm.weight"), &a.k_norm, vec![c.head_dim])
                    .map_err(io_err(&wpath))?;
            }
            Mixer::DeltaNet(d) => {
                for (n, lin) in [
                    ("in_proj_qkv", &d.in_qkv),
                    ("in_proj_z", &d.in_z),
                    ("in_proj_b", &d.in_b),
                    ("in_proj_a", &d.in_a),
                    ("out_proj", &d.out_proj),
                ] {
                    put_linear(
                        &mut ww,
                        &mut ctx,
                        Some(i),
                        &format!("{p}linear_attn.{n}"),
                        &format!("linear_attn.{n}"),
                        lin,
                        opts.other,
                    )?;
                }
                let la = format!("{p}linear_attn.");
                ww.put_vec(&format!("{la}conv1d.weight"), &d.conv, vec![c.conv_dim(), 1, c.conv_kernel])
                    .map_err(io_err(&wpath))?;
                ww.put_vec(&format!("{la}A_log"), &d.a_log, vec![c.linear_value_heads]).map_err(io_err(&wpath))?;
                ww.put_vec(&format!("{la}dt_bias"), &d.dt_bias, vec![c.linear_value_heads]).map_err(io_err(&wpath))?;
                ww.put_vec(&format!("{la}norm.weight"), &d.norm, vec![c.linear_value_dim]).map_err(io_err(&wpath))?;
            }
        }
        let m = &l.moe;
        put_linear(
            &mut ww,
            &mut ctx,
            Some(i),
            &format!("{p}mlp.gate"),
            "mlp.gate",
            &m.router,
            gate_target(opts.other),
        )?;
        put_linear(
            &mut ww,
            &mut ctx,
            Some(i),
            &format!("{p}mlp.shared_expert_gate"),
            "mlp.shared_expert_gate",
            &m.shared_gate,
            gate_target(opts.other),
        )?;
        for (n, lin) in [("gate_proj", &m.shared.gate), ("up_proj", &m.shared.up), ("down_proj", &m.shared.down)] {
            put_linear(
                &mut ww,
                &mut ctx,
                Some(i),
                &format!("{p}mlp.shared_expert.{n}"),
                &format!("mlp.shared_expert.{n}"),
                lin,
                opts.other,
            )?;
        }
        let experts = m
            .experts
            .resident()
            .ok_or_else(|| Error::input("convert needs the source experts mapped, not streamed"))?;
        let ef = write_expert_file(&partial, i, experts, opts.expert, group, &mut ctx)?;
        expert_bytes += ef.stride * ef.num_experts as u64;
        expert_files.push(ef);
    }
    let non_expert_bytes = ww.finish()?;

    let mut copied = Vec::new();
    for f in COPIED_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, partial.join(f)).map_err(|e| Error::file(&from, format!("cannot copy: {e}")))?;
            copied.push(f.to_string());
        }
    }
    write_model(&partial, dst, src, TensorLayout::Canonical, config_json, ww.entries, expert_files, copied)?;
    Ok(ConvertReport { dst: dst.to_path_buf(), non_expert_bytes, expert_bytes, rmse: ctx.rmse })
}

/// Ends a conversion: the model's config.json and manifest (`layout`, the tensors of
/// weights.bin, the expert files, the files copied beside them) in `partial`, then the folder
/// moved to `dst` (`finish_output`).
#[allow(clippy::too_many_arguments)]
fn write_model(
    partial: &Path,
    dst: &Path,
    src: &Path,
    layout: TensorLayout,
    config_json: serde_json::Value,
    tensors: Vec<TensorEntry>,
    experts: Vec<ExpertFile>,
    copied_files: Vec<String>,
) -> Result<()> {
    let cfg_out = partial.join("config.json");
    std::fs::write(&cfg_out, serde_json::to_string_pretty(&config_json).unwrap()).map_err(io_err(&cfg_out))?;
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: layout.version(),
        layout,
        config: config_json,
        source: src.display().to_string(),
        created_by: format!("flashmoe {}", env!("CARGO_PKG_VERSION")),
        weights_file: WEIGHTS_FILE.into(),
        tensors,
        experts,
        copied_files,
    };
    finish_output(partial, dst, &manifest)
}

/// Whether writing a packed model to `dst` may replace what is there: nothing there; or, with
/// `force`, a folder holding a packed model's manifest that is neither the source nor a folder
/// containing it. `--force` never deletes anything that is not a flashmoe output.
pub fn check_replaceable(dst: &Path, src: Option<&Path>, force: bool) -> Result<()> {
    if !dst.exists() {
        return Ok(());
    }
    if let (Some(src), Ok(d)) = (src, dst.canonicalize())
        && let Ok(s) = src.canonicalize()
    {
        if s == d {
            return Err(Error::file(dst, "destination is the source folder"));
        }
        if s.starts_with(&d) {
            return Err(Error::file(
                dst,
                format!("contains the source {}: replacing it would delete the source", s.display()),
            ));
        }
    }
    if !force {
        return Err(Error::file(dst, "already exists (pass --force to replace it)"));
    }
    if !dst.is_dir() || !dst.join(MANIFEST).is_file() {
        return Err(Error::file(
            dst,
            format!(
                "exists and is not a flashmoe packed model (no {MANIFEST}); --force only replaces a flashmoe output, so remove it yourself if it should go"
            ),
        ));
    }
    Ok(())
}

/// A packed output being written: `DST.partial`, locked by this process (a lock on
/// `DST.partial/.lock` held until the value is dropped) so that a second writer of the same
/// destination stops with a clear error instead of deleting this one's files.
pub struct PartialOutput {
    path: PathBuf,
    _lock: std::fs::File,
}

impl std::ops::Deref for PartialOutput {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

const PARTIAL_LOCK: &str = ".lock";

/// Opens (creating it if needed) the lock file `path` and takes an exclusive `flock` on it,
/// waiting for it when `wait`, else `None` when another process holds it. The lock lasts as
/// long as the returned file is open.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let how = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock on a file descriptor this process owns.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(Some(file));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(None),
            _ => return Err(Error::io(path, e)),
        }
    }
}

/// Starts a packed output for `dst`: an empty, locked `DST.partial` folder with its `experts/`
/// folder. A leftover one from an interrupted run (its lock free) is removed; one another process
/// is writing is an error. [`finish_output`] completes it.
pub fn start_output(dst: &Path) -> Result<PartialOutput> {
    let name = dst.file_name().ok_or_else(|| Error::file(dst, "destination has no folder name"))?;
    let partial = dst.with_file_name(format!("{}.partial", name.to_string_lossy()));
    let busy = || {
        Error::file(
            dst,
            format!("another flashmoe process is writing it ({} is locked); wait for it", partial.display()),
        )
    };
    if partial.is_dir() {
        if lock_file(&partial.join(PARTIAL_LOCK), false)?.is_none() {
            return Err(busy());
        }
        std::fs::remove_dir_all(&partial)
            .map_err(|e| Error::file(&partial, format!("cannot remove a previous partial output: {e}")))?;
    }
    std::fs::create_dir_all(partial.join("experts"))
        .map_err(|e| Error::file(&partial, format!("cannot create: {e}")))?;
    // Two writers that both found no partial folder: the second to lock stops here.
    let lock = lock_file(&partial.join(PARTIAL_LOCK), false)?.ok_or_else(busy)?;
    Ok(PartialOutput { path: partial, _lock: lock })
}

/// Completes a packed output written under `partial`: the manifest goes in last (a folder without
/// it is not a packed model), then the folder is renamed to `dst`, replacing an old `dst` only
/// once the new one is complete.
pub fn finish_output(partial: &Path, dst: &Path, manifest: &Manifest) -> Result<()> {
    // The lock file is not part of the model (the lock itself stays held until the caller drops
    // its `PartialOutput`).
    let _ = std::fs::remove_file(partial.join(PARTIAL_LOCK));
    let mpath = partial.join(MANIFEST);
    let mf = std::fs::File::create(&mpath).map_err(io_err(&mpath))?;
    serde_json::to_writer(BufWriter::new(&mf), manifest).map_err(|e| Error::file(&mpath, e.to_string()))?;
    mf.sync_all().map_err(io_err(&mpath))?;
    let name = dst.file_name().ok_or_else(|| Error::file(dst, "destination has no folder name"))?;
    if dst.exists() {
        let old = dst.with_file_name(format!("{}.old-{}", name.to_string_lossy(), std::process::id()));
        std::fs::rename(dst, &old).map_err(|e| Error::file(dst, format!("cannot move the old output aside: {e}")))?;
        std::fs::rename(partial, dst)
            .map_err(|e| Error::file(dst, format!("cannot rename the finished output: {e}")))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(partial, dst)
            .map_err(|e| Error::file(dst, format!("cannot rename the finished output: {e}")))?;
    }
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Encodes one layer's experts (in parallel, a bounded batch at a time) into one file of
/// fixed-stride blobs.
fn write_expert_file(
    partial: &Path,
    layer: usize,
    experts: &[ExpertWeights],
    target: Target,
    group: usize,
    ctx: &mut Ctx,
) -> Result<ExpertFile> {
    let rel = expert_file_name(layer);
    let path = partial.join(&rel);
    let mut file = std::fs::File::create(&path).map_err(|e| Error::file(&path, format!("cannot create: {e}")))?;
    let mut layout: Option<(Vec<TensorEntry>, u64, u64)> = None;
    let mut sums = Vec::with_capacity(experts.len());
    let mut errs: [(f64, f64, usize, String, String); 3] = Default::default();
    const BATCH: usize = 16;
    for (bi, batch) in experts.chunks(BATCH).enumerate() {
        let encoded: Vec<Result<[Encoded; 3]>> = batch
            .par_iter()
            .map(|ex| {
                Ok([encode(&ex.gate, target, group)?, encode(&ex.up, target, group)?, encode(&ex.down, target, group)?])
            })
            .collect();
        for (j, enc) in encoded.into_iter().enumerate() {
            let enc = enc?;
            let x = bi * BATCH + j;
            // Blob layout: components in order, each 64-byte aligned.
            let mut comps = Vec::new();
            let mut blob = Vec::new();
            for (proj, e) in ["gate_proj", "up_proj", "down_proj"].iter().zip(&enc) {
                for comp in &e.comps {
                    blob.resize(align_up(blob.len() as u64, 64) as usize, 0);
                    comps.push(TensorEntry {
                        name: format!("{proj}.{}", comp.suffix),
                        dtype: comp.dtype.into(),
                        shape: comp.shape.clone(),
                        offset: blob.len() as u64,
                        nbytes: comp.bytes.len() as u64,
                        quant: if comp.suffix == "weight" { e.quant.clone() } else { None },
                        xxh3: None,
                    });
                    blob.extend_from_slice(&comp.bytes);
                }
            }
            for (k, e) in enc.iter().enumerate() {
                if let Some((se, ss, n)) = e.err {
                    errs[k].0 += se;
                    errs[k].1 += ss;
                    errs[k].2 += n;
                    errs[k].3 = e.desc_from.clone();
                    errs[k].4 = e.desc_to.clone();
                }
            }
            let blob_bytes = blob.len() as u64;
            let stride = align_up(blob_bytes, ALIGN as u64);
            match &layout {
                None => layout = Some((comps, blob_bytes, stride)),
                Some((first, bb, _)) => {
                    if *bb != blob_bytes
                        || first
                            .iter()
                            .zip(&comps)
                            .any(|(a, b)| a.offset != b.offset || a.shape != b.shape || a.dtype != b.dtype)
                    {
                        return Err(Error::input(format!(
                            "layer {layer}: expert {x} is stored differently from expert 0; cannot pack"
                        )));
                    }
                }
            }
            blob.resize(stride as usize, 0);
            sums.push(xxh3_hex(&blob));
            file.seek(SeekFrom::Start(x as u64 * stride)).map_err(io_err(&path))?;
            file.write_all(&blob).map_err(io_err(&path))?;
            ctx.advance(experts[x].bytes())?;
        }
    }
    file.sync_all().map_err(io_err(&path))?;
    for (k, proj) in ["experts.gate_proj", "experts.up_proj", "experts.down_proj"].iter().enumerate() {
        let (se, ss, n, from, to) = &errs[k];
        if *n > 0 {
            ctx.rmse.push(RmseRow {
                layer: Some(layer),
                projection: proj.to_string(),
                from: from.clone(),
                to: to.clone(),
                rmse: (se / *n as f64).sqrt(),
                rms: (ss / *n as f64).sqrt(),
            });
        }
    }
    let (components, blob_bytes, stride) =
        layout.ok_or_else(|| Error::input(format!("layer {layer} has no experts")))?;
    Ok(ExpertFile { layer, file: rel, num_experts: experts.len(), stride, blob_bytes, components, xxh3: sums })
}
