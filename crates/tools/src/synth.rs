//! `flashmoe synth`: a packed model with random weights and the real dimensions of a Qwen3.5-MoE
//! or Qwen3-Next geometry (or only its first N layers), for benchmarks of expert streaming without
//! downloading hundreds of gigabytes.
//!
//! The output is exactly the packed format of [`flashmoe::packed`] (manifest, config.json,
//! weights.bin, experts/layer_NNN.bin, written under `DST.partial` and renamed when complete), so
//! `verify` and `Model::load` accept it. Quantized matrices are generated directly as random
//! codes (uniform over the 2^bits levels) with one bf16 scale and bias per row chosen so the
//! dequantized weights have mean ≈ 0 and standard deviation ≈ 1/√in_features: activations stay
//! O(1) through the layers. Embedding rows have standard deviation 1. Norm weights are effective
//! multipliers in U(0.95, 1.05), `A_log` = ln U(1, 16), `dt_bias` ~ N(0, 0.1), conv weights
//! ~ N(0, 0.5).
//!
//! Every tensor and every expert draws from its own seeded xoshiro256++ stream (keyed by the seed
//! and the tensor name, or by (layer, expert), and for large tensors by 1 MiB chunk), so experts
//! are generated in parallel and the same seed gives byte-identical files on any thread count.
//! Generation and writing overlap: a writer thread writes large sequential buffers while the
//! next ones are generated.
//!
//! Synth models have no tokenizer unless `tokenizer_from` names a folder to copy one from (its
//! ids must fit the vocabulary): they are meant for `logits` and `bench`, driven by token ids.
//!
//! ## `routing_like`: shaping the routers after a real profile
//!
//! A profile (../shared/data/routing) gives per layer the gini coefficient of the expert
//! selection counts and the top-20% coverage. Without a profile all router rows have the same
//! distribution and routing is near-uniform. With one, router row e of layer l is scaled by
//! f_e = exp(s_l·u_e) (u_e ~ N(0, 1), fixed by the seed): rows with larger norms win top-k more
//! often. The spread s_l is calibrated per layer by simulation: top-k selection over
//! `sim_tokens` router inputs drawn as isotropic Gaussians, binary-searching s_l until the gini of
//! the simulated counts matches the profile layer. Gaussian inputs are a proxy for the hidden
//! states the synthetic model produces: its router input is RMSNorm of a residual stream that is
//! a sum of random projections of random embeddings, with norm weights ≈ 1, i.e. close to
//! isotropic; running the model itself during synth would cost a full forward pass per simulated
//! token. The simulation is exact for the stored weights: logits are
//! scale_e·Σ_j (q_ej − c)·x_j + (bias_e + c·scale_e)·Σ_j x_j with the stored bf16 scale and bias,
//! so the reported "achieved" statistics are those of the router as written. The gini includes
//! the sampling noise of `sim_tokens` tokens, as the profiles (measured on a few thousand tokens)
//! do. Only the count distribution is shaped: consecutive-token overlap of a random model stays
//! near K/E (measure it with `--trace-routing` and `routing-stats`).

use crate::routing_stats::{self as routing, ProfileLayer};
use flashmoe::ModelConfig;
use flashmoe::Progress;
use flashmoe::config::LayerKind;
use flashmoe::error::{Error, Result};
use flashmoe::packed::{
    ALIGN, COPIED_FILES, ExpertFile, FORMAT_NAME, FORMAT_VERSION, Manifest, QuantInfo, TensorEntry, WEIGHTS_FILE,
    align_up, expert_file_name, xxh3_hex,
};
use half::bf16;
use rayon::prelude::*;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Geometries

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geometry {
    Qwen35_397bA17b,
    Qwen35_122bA10b,
    Qwen35_35bA3b,
    Qwen3Next80bA3b,
    /// Hidden 64, 8 layers, 16 experts (top 4): a whole model is about 1 MB. For tests.
    Tiny,
}

/// The numbers a geometry's config.json is written from (spec §1.2). Nothing else reads them:
/// the generator reads the [`ModelConfig`] parsed from that config.json.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    /// Qwen3-Next (flat `qwen3_next` config, plain RoPE) rather than Qwen3.5-MoE.
    pub next: bool,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub linear_key_heads: usize,
    pub linear_value_heads: usize,
    pub linear_key_dim: usize,
    pub linear_value_dim: usize,
    pub conv_kernel: usize,
    pub experts: usize,
    pub top_k: usize,
    pub moe_intermediate: usize,
    pub shared_intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub mrope_section: Option<[usize; 3]>,
    pub eos: u32,
    pub bos: Option<u32>,
}

impl Geometry {
    pub const ALL: [Geometry; 5] = [
        Geometry::Qwen35_397bA17b,
        Geometry::Qwen35_122bA10b,
        Geometry::Qwen35_35bA3b,
        Geometry::Qwen3Next80bA3b,
        Geometry::Tiny,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Geometry::Qwen35_397bA17b => "qwen3.5-397b-a17b",
            Geometry::Qwen35_122bA10b => "qwen3.5-122b-a10b",
            Geometry::Qwen35_35bA3b => "qwen3.5-35b-a3b",
            Geometry::Qwen3Next80bA3b => "qwen3-next-80b-a3b",
            Geometry::Tiny => "tiny",
        }
    }

    fn spec(&self) -> Spec {
        let qwen35 = |hidden, layers, heads, lvh, experts, top_k, inter| Spec {
            next: false,
            hidden,
            layers,
            heads,
            kv_heads: 2,
            head_dim: 256,
            linear_key_heads: 16,
            linear_value_heads: lvh,
            linear_key_dim: 128,
            linear_value_dim: 128,
            conv_kernel: 4,
            experts,
            top_k,
            moe_intermediate: inter,
            shared_intermediate: inter,
            vocab: 248_320,
            rope_theta: 1e7,
            mrope_section: Some([11, 11, 10]),
            eos: 248_044,
            bos: None,
        };
        match self {
            Geometry::Qwen35_397bA17b => qwen35(4096, 60, 32, 64, 512, 10, 1024),
            Geometry::Qwen35_122bA10b => qwen35(3072, 48, 32, 64, 256, 8, 1024),
            Geometry::Qwen35_35bA3b => qwen35(2048, 40, 16, 32, 256, 8, 512),
            Geometry::Qwen3Next80bA3b => Spec {
                next: true,
                vocab: 151_936,
                mrope_section: None,
                eos: 151_645,
                bos: Some(151_643),
                ..qwen35(2048, 48, 16, 32, 512, 10, 512)
            },
            Geometry::Tiny => Spec {
                next: false,
                hidden: 64,
                layers: 8,
                heads: 4,
                kv_heads: 2,
                head_dim: 64,
                linear_key_heads: 2,
                linear_value_heads: 4,
                linear_key_dim: 16,
                linear_value_dim: 32,
                conv_kernel: 4,
                experts: 16,
                top_k: 4,
                moe_intermediate: 64,
                shared_intermediate: 64,
                vocab: 512,
                rope_theta: 1e4,
                mrope_section: Some([3, 3, 2]),
                eos: 1,
                bos: None,
            },
        }
    }

    /// The model config (only the first `layers` layers when given).
    pub fn config_json(&self, layers: Option<usize>) -> Value {
        self.spec().config_json(layers)
    }

    /// The model config parsed (only the first `layers` layers when given): what the generator
    /// reads its dimensions from.
    pub fn config(&self, layers: Option<usize>) -> Result<ModelConfig> {
        ModelConfig::from_value(&self.config_json(layers), Path::new("config.json"))
    }

    /// Number of layers of the whole geometry.
    pub fn num_layers(&self) -> usize {
        self.spec().layers
    }
}

impl std::str::FromStr for Geometry {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Geometry::ALL
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("`{s}`: expected one of {}", Geometry::ALL.map(|g| g.name()).join(", ")))
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Spec {
    /// Layer i is full attention every 4th layer (3, 7, 11, …), as in the real models.
    fn is_full_attention(i: usize) -> bool {
        (i + 1).is_multiple_of(4)
    }

    /// A complete `qwen3_5_moe_text` (or `qwen3_next`) config for the first `layers` layers.
    fn config_json(&self, layers: Option<usize>) -> Value {
        let n = layers.unwrap_or(self.layers);
        let layer_types: Vec<&str> =
            (0..n).map(|i| if Spec::is_full_attention(i) { "full_attention" } else { "linear_attention" }).collect();
        let mut rope = json!({
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": 0.25,
        });
        if let Some(s) = self.mrope_section {
            rope["mrope_section"] = json!(s);
            rope["mrope_interleaved"] = json!(true);
        }
        let mut c = json!({
            "model_type": if self.next { "qwen3_next" } else { "qwen3_5_moe_text" },
            "architectures": [if self.next { "Qwen3NextForCausalLM" } else { "Qwen3_5MoeForCausalLM" }],
            "hidden_size": self.hidden,
            "num_hidden_layers": n,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "linear_num_key_heads": self.linear_key_heads,
            "linear_num_value_heads": self.linear_value_heads,
            "linear_key_head_dim": self.linear_key_dim,
            "linear_value_head_dim": self.linear_value_dim,
            "linear_conv_kernel_dim": self.conv_kernel,
            "num_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "moe_intermediate_size": self.moe_intermediate,
            "shared_expert_intermediate_size": self.shared_intermediate,
            "vocab_size": self.vocab,
            "full_attention_interval": 4,
            "layer_types": layer_types,
            "rope_parameters": rope,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "attention_bias": false,
            "tie_word_embeddings": false,
            "max_position_embeddings": 262_144,
            "eos_token_id": self.eos,
        });
        if self.next {
            let o = c.as_object_mut().unwrap();
            o.insert("norm_topk_prob".into(), json!(true));
            o.insert("decoder_sparse_step".into(), json!(1));
            o.insert("mlp_only_layers".into(), json!([]));
            o.insert("intermediate_size".into(), json!(5120));
        }
        if let Some(b) = self.bos {
            c["bos_token_id"] = json!(b);
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers: xoshiro256++ seeded through splitmix64, one stream per key.

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator (xoshiro256++). Streams for different keys are independent.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Rng { s: [splitmix(&mut x), splitmix(&mut x), splitmix(&mut x), splitmix(&mut x)] }
    }

    /// A stream keyed by several numbers (seed, tensor, chunk, …).
    pub fn keyed(parts: &[u64]) -> Self {
        let mut h = 0x6a09_e667_f3bc_c908u64;
        for &p in parts {
            h ^= p;
            h = splitmix(&mut h);
        }
        Rng::new(h)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let n = rest.len();
        rest.copy_from_slice(&self.next_u64().to_le_bytes()[..n]);
    }
}

fn name_key(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

const TAG_EXPERT: u64 = 0x4558_5045_5254; // "EXPERT"
const TAG_SIM: u64 = 0x53_494d; // "SIM"
const TAG_SPREAD: u64 = 0x5350_5245_4144; // "SPREAD"
const CHUNK: usize = 1 << 20;

/// Random bytes, in parallel 1 MiB chunks with one stream each (thread-count independent).
fn fill_random_par(buf: &mut [u8], key: u64) {
    buf.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| Rng::keyed(&[key, i as u64]).fill_bytes(c));
}

fn fill_bf16(buf: &mut [u8], v: bf16) {
    let b = v.to_le_bytes();
    for c in buf.chunks_exact_mut(2) {
        c.copy_from_slice(&b);
    }
}

/// Scale and bias that make uniform random codes dequantize to mean 0, standard deviation `std`.
pub fn affine_params(bits: u32, std: f64) -> (f64, f64) {
    let levels = (1u64 << bits) as f64;
    let code_std = ((levels * levels - 1.0) / 12.0).sqrt();
    let scale = std / code_std;
    (scale, -scale * (levels - 1.0) / 2.0)
}

// ---------------------------------------------------------------------------------------------
// Options and report

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub geometry: Geometry,
    /// Only the first N layers (default: all).
    pub layers: Option<usize>,
    /// Routed experts: 2, 4 or 8 bits.
    pub expert_bits: u32,
    /// Other matrices: 4 or 8 bits (routers and the shared-expert gate are never below 8).
    pub bits: u32,
    pub group_size: usize,
    /// A routing profile (JSON) whose per-layer gini the routers are shaped to match.
    pub routing_like: Option<PathBuf>,
    pub seed: u64,
    /// Override the vocabulary size.
    pub vocab: Option<usize>,
    /// Override the number of experts / experts per token.
    pub experts: Option<usize>,
    pub top_k: Option<usize>,
    /// Copy tokenizer and chat-template files from this folder.
    pub tokenizer_from: Option<PathBuf>,
    /// Tokens simulated per layer to calibrate `routing_like`.
    pub sim_tokens: usize,
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            geometry: Geometry::Tiny,
            layers: None,
            expert_bits: 4,
            bits: 4,
            group_size: 64,
            routing_like: None,
            seed: 0,
            vocab: None,
            experts: None,
            top_k: None,
            tokenizer_from: None,
            sim_tokens: 2048,
            out: PathBuf::new(),
            force: false,
        }
    }
}

/// How well one layer's router matches its profile layer (simulated on Gaussian inputs).
#[derive(Clone, Debug)]
pub struct RoutingFit {
    pub layer: usize,
    pub profile_layer: usize,
    pub target_gini: f64,
    pub target_top20: Option<f64>,
    pub achieved_gini: f64,
    pub achieved_top20: f64,
    /// The calibrated spread s of the row factors exp(s·u).
    pub spread: f64,
}

#[derive(Clone, Debug)]
pub struct SynthReport {
    pub dst: PathBuf,
    pub config: Value,
    pub non_expert_bytes: u64,
    pub expert_bytes: u64,
    pub seconds: f64,
    /// Bytes written per second (generation, writing and fsync together).
    pub bytes_per_sec: f64,
    pub routing: Vec<RoutingFit>,
    pub copied_files: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// The plan: every non-expert tensor in the order convert writes them.

#[derive(Clone, Copy, Debug)]
enum VecInit {
    Norm,
    ALog,
    DtBias,
    Conv,
}

#[derive(Clone, Debug)]
enum Item {
    Linear { base: String, rows: usize, cols: usize, bits: u32, std: f64, router_layer: Option<usize> },
    Vector { name: String, shape: Vec<usize>, init: VecInit },
}

impl Item {
    fn bytes(&self, group: usize) -> u64 {
        match self {
            Item::Linear { rows, cols, bits, .. } => {
                let w = (rows * cols * *bits as usize / 8) as u64;
                let sb = (rows * (cols / group) * 2) as u64;
                align_up(w, ALIGN as u64) + 2 * align_up(sb, ALIGN as u64)
            }
            Item::Vector { shape, .. } => align_up(shape.iter().product::<usize>() as u64 * 4, ALIGN as u64),
        }
    }
}

/// Bytes of data in one expert blob and its 4 KiB-aligned stride, at `bits` / `group`.
pub fn expert_blob(c: &ModelConfig, bits: u32, group: usize) -> (u64, u64) {
    let l = blob_layout(c, bits, group);
    (l.blob_bytes, l.stride)
}

fn plan(d: &ModelConfig, bits: u32) -> Vec<Item> {
    let h = d.hidden_size;
    let lin = |base: String, rows: usize, cols: usize, bits: u32| Item::Linear {
        base,
        rows,
        cols,
        bits,
        std: 1.0 / (cols as f64).sqrt(),
        router_layer: None,
    };
    let vec = |name: String, shape: Vec<usize>, init| Item::Vector { name, shape, init };
    let gate_bits = bits.max(8);
    let mut items = vec![
        Item::Linear {
            base: "model.embed_tokens".into(),
            rows: d.vocab_size,
            cols: h,
            bits,
            std: 1.0,
            router_layer: None,
        },
        lin("lm_head".into(), d.vocab_size, h, bits),
        vec("model.norm.weight".into(), vec![h], VecInit::Norm),
    ];
    for i in 0..d.num_layers {
        let p = format!("model.layers.{i}.");
        items.push(vec(format!("{p}input_layernorm.weight"), vec![h], VecInit::Norm));
        items.push(vec(format!("{p}post_attention_layernorm.weight"), vec![h], VecInit::Norm));
        if d.layer_kinds[i] == LayerKind::FullAttention {
            let a = format!("{p}self_attn.");
            let (nh, nkv, hd) = (d.num_heads, d.num_kv_heads, d.head_dim);
            items.push(lin(format!("{a}q_proj"), 2 * nh * hd, h, bits));
            items.push(lin(format!("{a}k_proj"), nkv * hd, h, bits));
            items.push(lin(format!("{a}v_proj"), nkv * hd, h, bits));
            items.push(lin(format!("{a}o_proj"), h, nh * hd, bits));
            items.push(vec(format!("{a}q_norm.weight"), vec![hd], VecInit::Norm));
            items.push(vec(format!("{a}k_norm.weight"), vec![hd], VecInit::Norm));
        } else {
            let a = format!("{p}linear_attn.");
            let hv = d.linear_value_heads;
            items.push(lin(format!("{a}in_proj_qkv"), d.conv_dim(), h, bits));
            items.push(lin(format!("{a}in_proj_z"), d.value_dim(), h, bits));
            items.push(lin(format!("{a}in_proj_b"), hv, h, bits));
            items.push(lin(format!("{a}in_proj_a"), hv, h, bits));
            items.push(lin(format!("{a}out_proj"), h, d.value_dim(), bits));
            items.push(vec(format!("{a}conv1d.weight"), vec![d.conv_dim(), 1, d.conv_kernel], VecInit::Conv));
            items.push(vec(format!("{a}A_log"), vec![hv], VecInit::ALog));
            items.push(vec(format!("{a}dt_bias"), vec![hv], VecInit::DtBias));
            items.push(vec(format!("{a}norm.weight"), vec![d.linear_value_dim], VecInit::Norm));
        }
        let m = format!("{p}mlp.");
        items.push(Item::Linear {
            base: format!("{m}gate"),
            rows: d.num_experts,
            cols: h,
            bits: gate_bits,
            std: 1.0 / (h as f64).sqrt(),
            router_layer: Some(i),
        });
        items.push(lin(format!("{m}shared_expert_gate"), 1, h, gate_bits));
        let is = d.shared_intermediate;
        items.push(lin(format!("{m}shared_expert.gate_proj"), is, h, bits));
        items.push(lin(format!("{m}shared_expert.up_proj"), is, h, bits));
        items.push(lin(format!("{m}shared_expert.down_proj"), h, is, bits));
    }
    items
}

/// (suffix, dtype, shape, bytes, constant bf16 fill or None for random codes).
type BlobPart = (&'static str, &'static str, Vec<usize>, usize, Option<bf16>);

/// Where each piece of one expert blob goes and what fills it.
struct BlobLayout {
    components: Vec<TensorEntry>,
    /// (offset, bytes, None = random codes / Some(value) = constant bf16).
    fills: Vec<(usize, usize, Option<bf16>)>,
    blob_bytes: u64,
    stride: u64,
}

fn blob_layout(d: &ModelConfig, bits: u32, group: usize) -> BlobLayout {
    let (h, i) = (d.hidden_size, d.moe_intermediate);
    let mut components = Vec::new();
    let mut fills = Vec::new();
    let mut pos = 0usize;
    for (proj, rows, cols) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
        let (scale, bias) = affine_params(bits, 1.0 / (cols as f64).sqrt());
        let parts: [BlobPart; 3] = [
            ("weight", "U32", vec![rows, cols * bits as usize / 32], rows * cols * bits as usize / 8, None),
            ("scales", "BF16", vec![rows, cols / group], rows * (cols / group) * 2, Some(bf16::from_f64(scale))),
            ("biases", "BF16", vec![rows, cols / group], rows * (cols / group) * 2, Some(bf16::from_f64(bias))),
        ];
        for (suffix, dtype, shape, nbytes, fill) in parts {
            pos = align_up(pos as u64, 64) as usize;
            components.push(TensorEntry {
                name: format!("{proj}.{suffix}"),
                dtype: dtype.into(),
                shape,
                offset: pos as u64,
                nbytes: nbytes as u64,
                quant: (suffix == "weight").then_some(QuantInfo { bits, group_size: group }),
                xxh3: None,
            });
            fills.push((pos, nbytes, fill));
            pos += nbytes;
        }
    }
    BlobLayout { components, fills, blob_bytes: pos as u64, stride: align_up(pos as u64, ALIGN as u64) }
}

/// Fills one expert's stride (already zeroed) and returns its checksum.
fn gen_expert(blob: &mut [u8], layout: &BlobLayout, seed: u64, layer: usize, x: usize) -> String {
    let mut rng = Rng::keyed(&[seed, TAG_EXPERT, layer as u64, x as u64]);
    for &(off, n, fill) in &layout.fills {
        let dst = &mut blob[off..off + n];
        match fill {
            None => rng.fill_bytes(dst),
            Some(v) => fill_bf16(dst, v),
        }
    }
    xxh3_hex(blob)
}

// ---------------------------------------------------------------------------------------------
// Output pipeline: the generating thread hands buffers to a writer thread.

enum Msg {
    Open(PathBuf),
    Data(Vec<u8>),
}

struct Out<'a> {
    tx: mpsc::SyncSender<Msg>,
    back: mpsc::Receiver<Vec<u8>>,
    cancelled: &'a AtomicBool,
}

impl Out<'_> {
    fn buffer(&self) -> Vec<u8> {
        let mut b = self.back.try_recv().unwrap_or_default();
        b.clear();
        b
    }
    fn send(&self, m: Msg) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::input("synth cancelled"));
        }
        // A closed channel means the writer failed; its error is reported when it is joined.
        self.tx.send(m).map_err(|_| Error::input("synth writer stopped"))
    }
}

fn writer(
    rx: mpsc::Receiver<Msg>,
    back: mpsc::Sender<Vec<u8>>,
    progress: &dyn Progress,
    cancelled: &AtomicBool,
) -> Result<()> {
    let mut cur: Option<(std::fs::File, PathBuf)> = None;
    let close = |cur: &mut Option<(std::fs::File, PathBuf)>| -> Result<()> {
        if let Some((f, p)) = cur.take() {
            f.sync_all().map_err(|e| Error::file(&p, format!("write failed: {e}")))?;
        }
        Ok(())
    };
    for m in rx {
        match m {
            Msg::Open(p) => {
                close(&mut cur)?;
                let f = std::fs::File::create(&p).map_err(|e| Error::file(&p, format!("cannot create: {e}")))?;
                cur = Some((f, p));
            }
            Msg::Data(buf) => {
                let (f, p) = cur.as_mut().expect("a file is open before data");
                f.write_all(&buf).map_err(|e| Error::file(&*p, format!("write failed: {e}")))?;
                if !progress.inc(buf.len() as u64) {
                    cancelled.store(true, Ordering::SeqCst);
                }
                let _ = back.send(buf);
            }
        }
    }
    close(&mut cur)
}

/// Non-expert tensors, packed into 4 KiB-aligned slots of weights.bin.
struct WeightsOut {
    buf: Vec<u8>,
    /// File offset of buf[0].
    base: u64,
    entries: Vec<TensorEntry>,
}

impl WeightsOut {
    const FLUSH: usize = 32 << 20;

    #[allow(clippy::too_many_arguments)]
    fn put_with(
        &mut self,
        out: &Out,
        name: String,
        dtype: &str,
        shape: Vec<usize>,
        nbytes: usize,
        quant: Option<QuantInfo>,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        let at = align_up(self.base + self.buf.len() as u64, ALIGN as u64);
        let start = (at - self.base) as usize;
        self.buf.resize(start + nbytes, 0);
        let dst = &mut self.buf[start..];
        fill(dst);
        self.entries.push(TensorEntry {
            name,
            dtype: dtype.into(),
            shape,
            offset: at,
            nbytes: nbytes as u64,
            quant,
            xxh3: Some(xxh3_hex(dst)),
        });
        if self.buf.len() >= Self::FLUSH {
            self.flush(out)?;
        }
        Ok(())
    }

    fn flush(&mut self, out: &Out) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = out.buffer();
        let full = std::mem::replace(&mut self.buf, next);
        self.base += full.len() as u64;
        out.send(Msg::Data(full))
    }

    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
}

fn put_linear(
    w: &mut WeightsOut,
    out: &Out,
    seed: u64,
    base: &str,
    (rows, cols, bits, group, std): (usize, usize, u32, usize, f64),
    row_factors: Option<&[f32]>,
) -> Result<()> {
    let wname = format!("{base}.weight");
    let key = name_key(&wname) ^ seed.rotate_left(17);
    w.put_with(
        out,
        wname,
        "U32",
        vec![rows, cols * bits as usize / 32],
        rows * cols * bits as usize / 8,
        Some(QuantInfo { bits, group_size: group }),
        |b| fill_random_par(b, key),
    )?;
    let (scale, bias) = affine_params(bits, std);
    let groups = cols / group;
    for (suffix, v) in [("scales", scale), ("biases", bias)] {
        w.put_with(out, format!("{base}.{suffix}"), "BF16", vec![rows, groups], rows * groups * 2, None, |b| {
            match row_factors {
                None => fill_bf16(b, bf16::from_f64(v)),
                Some(f) => {
                    for (r, row) in b.chunks_exact_mut(groups * 2).enumerate() {
                        fill_bf16(row, bf16::from_f64(v * f[r] as f64));
                    }
                }
            }
        })?;
    }
    Ok(())
}

fn vector_values(seed: u64, name: &str, n: usize, init: VecInit) -> Vec<f32> {
    let mut rng = Rng::keyed(&[seed, name_key(name)]);
    (0..n)
        .map(|_| match init {
            VecInit::Norm => 0.95 + 0.1 * rng.uniform() as f32,
            VecInit::ALog => (1.0 + 15.0 * rng.uniform()).ln() as f32,
            VecInit::DtBias => 0.1 * rng.normal() as f32,
            VecInit::Conv => 0.5 * rng.normal() as f32,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Router calibration

/// The routing simulation of one layer: centred-code projections of Gaussian inputs.
struct RouterSim {
    experts: usize,
    top_k: usize,
    tokens: usize,
    /// a[n·E + e] = Σ_j (q_ej − c)·x_nj
    a: Vec<f32>,
    /// b[n] = Σ_j x_nj
    b: Vec<f32>,
    c: f64,
}

impl RouterSim {
    fn new(
        codes: &[u8],
        bits: u32,
        experts: usize,
        hidden: usize,
        top_k: usize,
        tokens: usize,
        rng_key: &[u64],
    ) -> Self {
        let mask = (1u32 << bits) - 1;
        let c = mask as f64 / 2.0;
        let xs: Vec<f32> = (0..tokens)
            .into_par_iter()
            .flat_map_iter(|n| {
                let mut k = rng_key.to_vec();
                k.push(n as u64);
                let mut rng = Rng::keyed(&k);
                (0..hidden).map(move |_| rng.normal() as f32).collect::<Vec<_>>()
            })
            .collect();
        let b: Vec<f32> = xs.chunks_exact(hidden).map(|x| x.iter().sum()).collect();
        let row_bytes = hidden * bits as usize / 8;
        // Column-major first (one expert row at a time), then transposed to token-major.
        let at: Vec<Vec<f32>> = (0..experts)
            .into_par_iter()
            .map(|e| {
                let words = &codes[e * row_bytes..(e + 1) * row_bytes];
                let q: Vec<f32> = (0..hidden)
                    .map(|j| {
                        let bit = j * bits as usize;
                        let byte = bit / 8;
                        let v = (words[byte] as u32 | (*words.get(byte + 1).unwrap_or(&0) as u32) << 8) >> (bit % 8);
                        (v & mask) as f32 - c as f32
                    })
                    .collect();
                xs.chunks_exact(hidden).map(|x| dot(&q, x)).collect()
            })
            .collect();
        let mut a = vec![0.0f32; tokens * experts];
        for (e, col) in at.iter().enumerate() {
            for (n, &v) in col.iter().enumerate() {
                a[n * experts + e] = v;
            }
        }
        RouterSim { experts, top_k, tokens, a, b, c }
    }

    /// Selection counts for per-expert logit = mul[e]·a + add[e]·b.
    fn counts(&self, mul: &[f32], add: &[f32]) -> Vec<u64> {
        let (e, k) = (self.experts, self.top_k);
        (0..self.tokens)
            .into_par_iter()
            .fold(
                || (vec![0u64; e], vec![0.0f32; e], (0..e).collect::<Vec<usize>>()),
                |(mut counts, mut l, mut idx), n| {
                    let a = &self.a[n * e..(n + 1) * e];
                    let bn = self.b[n];
                    for x in 0..e {
                        l[x] = mul[x] * a[x] + add[x] * bn;
                    }
                    if k < e {
                        idx.select_nth_unstable_by(k - 1, |&x, &y| l[y].total_cmp(&l[x]).then(x.cmp(&y)));
                    }
                    for &x in &idx[..k] {
                        counts[x] += 1;
                    }
                    (counts, l, idx)
                },
            )
            .map(|(c, _, _)| c)
            .reduce(
                || vec![0u64; e],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            )
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Finds the row factors exp(s·u_e) whose simulated routing gini matches the target.
#[allow(clippy::too_many_arguments)]
fn calibrate_router(
    seed: u64,
    layer: usize,
    codes: &[u8],
    d: &ModelConfig,
    bits: u32,
    std: f64,
    target: &ProfileLayer,
    sim_tokens: usize,
) -> (Vec<f32>, f64, f64, f64) {
    let e = d.num_experts;
    let sim =
        RouterSim::new(codes, bits, e, d.hidden_size, d.experts_per_token, sim_tokens, &[seed, TAG_SIM, layer as u64]);
    let mut rng = Rng::keyed(&[seed, TAG_SPREAD, layer as u64]);
    let mut u: Vec<f64> = (0..e).map(|_| rng.normal()).collect();
    let mean = u.iter().sum::<f64>() / e as f64;
    u.iter_mut().for_each(|x| *x -= mean);
    let zeros = vec![0.0f32; e];
    let gini_at = |s: f64| {
        let mul: Vec<f32> = u.iter().map(|x| (s * x).exp() as f32).collect();
        routing::gini(&sim.counts(&mul, &zeros))
    };
    let (mut lo, mut hi) = (0.0f64, 8.0f64);
    let s = if gini_at(lo) >= target.gini {
        0.0
    } else if gini_at(hi) <= target.gini {
        hi
    } else {
        for _ in 0..24 {
            let mid = 0.5 * (lo + hi);
            if gini_at(mid) < target.gini {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let factors: Vec<f32> = u.iter().map(|x| (s * x).exp() as f32).collect();
    // The router exactly as stored: bf16 scale and bias per row.
    let (scale, bias) = affine_params(bits, std);
    let mut mul = vec![0.0f32; e];
    let mut add = vec![0.0f32; e];
    for x in 0..e {
        let sc = bf16::from_f64(scale * factors[x] as f64).to_f32();
        let bi = bf16::from_f64(bias * factors[x] as f64).to_f32();
        mul[x] = sc;
        add[x] = (bi as f64 + sim.c * sc as f64) as f32;
    }
    let counts = sim.counts(&mul, &add);
    (factors, s, routing::gini(&counts), routing::top_coverage(&counts, 0.2))
}

// ---------------------------------------------------------------------------------------------

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::file(path, format!("write failed: {e}"))
}

/// Largest token id a tokenizer.json can produce (vocabulary and added tokens).
fn tokenizer_max_id(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("malformed JSON: {e}")))?;
    let mut max = 0u64;
    if let Some(vocab) = v.pointer("/model/vocab").and_then(Value::as_object) {
        max = vocab.values().filter_map(Value::as_u64).fold(max, u64::max);
    }
    if let Some(added) = v.get("added_tokens").and_then(Value::as_array) {
        max = added.iter().filter_map(|t| t.get("id").and_then(Value::as_u64)).fold(max, u64::max);
    }
    Ok(max)
}

/// Writes a random-weight packed model; see the module docs.
/// `progress` hears the bytes written (one phase, labelled `synth`), a `layer i/N` message as
/// each layer's experts start, and may cancel.
pub fn synth(opts: &SynthOptions, progress: &dyn Progress) -> Result<SynthReport> {
    let result = synth_inner(opts, progress);
    progress.finish();
    result
}

fn synth_inner(opts: &SynthOptions, progress: &dyn Progress) -> Result<SynthReport> {
    let t0 = Instant::now();
    let mut d = opts.geometry.spec();
    if let Some(v) = opts.vocab {
        d.vocab = v;
    }
    if let Some(e) = opts.experts {
        d.experts = e;
    }
    if let Some(k) = opts.top_k {
        d.top_k = k;
    }
    let layers = opts.layers.unwrap_or(d.layers);
    if layers == 0 || layers > d.layers {
        return Err(Error::input(format!("--layers {layers}: {} has 1 to {} layers", opts.geometry, d.layers)));
    }
    if ![2, 4, 8].contains(&opts.expert_bits) {
        return Err(Error::input(format!("--expert-bits {}: must be 2, 4 or 8", opts.expert_bits)));
    }
    if ![4, 8].contains(&opts.bits) {
        return Err(Error::input(format!("--bits {}: must be 4 or 8", opts.bits)));
    }
    let group = opts.group_size;
    if ![32, 64, 128].contains(&group) {
        return Err(Error::input(format!("--group-size {group}: must be 32, 64 or 128")));
    }
    if d.vocab == 0 || d.experts == 0 || d.top_k == 0 || d.top_k > d.experts {
        return Err(Error::input(format!("need vocab ≥ 1 and 1 ≤ top-k ({}) ≤ experts ({})", d.top_k, d.experts)));
    }
    // Everything below reads the dimensions from the config the model is written with.
    let config_json = d.config_json(Some(layers));
    let full_layers = d.layers;
    let d = ModelConfig::from_value(&config_json, Path::new("config.json"))?;
    let items = plan(&d, opts.bits);
    for it in &items {
        if let Item::Linear { base, cols, .. } = it
            && !cols.is_multiple_of(group)
        {
            return Err(Error::input(format!("`{base}` has {cols} inputs, not a multiple of the group size {group}")));
        }
    }
    if !d.moe_intermediate.is_multiple_of(group) {
        return Err(Error::input(format!(
            "expert inputs ({}) are not a multiple of the group size {group}",
            d.moe_intermediate
        )));
    }
    let profile = match &opts.routing_like {
        Some(p) => Some(routing::load_profile(p)?),
        None => None,
    };
    if profile.is_some() && opts.sim_tokens == 0 {
        return Err(Error::input("sim_tokens must be at least 1"));
    }
    if let Some(dir) = &opts.tokenizer_from {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::NotFound(tj));
        }
        let max = tokenizer_max_id(&tj)?;
        if max >= d.vocab_size as u64 {
            return Err(Error::file(
                &tj,
                format!("has token ids up to {max}, beyond the model's vocabulary of {}", d.vocab_size),
            ));
        }
    }

    let dst = &opts.out;
    flashmoe::convert::check_replaceable(dst, None, opts.force)?;
    let partial = flashmoe::convert::start_output(dst)?;

    let layout = blob_layout(&d, opts.expert_bits, group);
    let expert_bytes = layout.stride * (d.num_experts * layers) as u64;
    let non_expert_estimate: u64 = items.iter().map(|i| i.bytes(group)).sum();
    progress.start(non_expert_estimate + expert_bytes, "synth");

    let seed = opts.seed;
    let cancelled = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<Msg>(1);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let mut fits = Vec::new();
    let mut expert_files = Vec::new();
    let mut wout = WeightsOut { buf: Vec::new(), base: 0, entries: Vec::new() };
    let (gen_result, write_result) = std::thread::scope(|scope| {
        let cancelled = &cancelled;
        let w = scope.spawn(move || writer(rx, back_tx, progress, cancelled));
        let out = Out { tx, back: back_rx, cancelled };
        let r = (|| -> Result<()> {
            out.send(Msg::Open(partial.join(WEIGHTS_FILE)))?;
            for it in &items {
                match it {
                    Item::Linear { base, rows, cols, bits, std, router_layer } => {
                        let shape = (*rows, *cols, *bits, group, *std);
                        let factors = match (router_layer, &profile) {
                            (Some(l), Some(prof)) => {
                                let pl = routing::profile_layer_for(*l, full_layers, prof.len());
                                // The same codes put_linear will write.
                                let mut codes = vec![0u8; rows * cols * *bits as usize / 8];
                                let wname = format!("{base}.weight");
                                fill_random_par(&mut codes, name_key(&wname) ^ seed.rotate_left(17));
                                let (f, s, g, t20) =
                                    calibrate_router(seed, *l, &codes, &d, *bits, *std, &prof[pl], opts.sim_tokens);
                                progress
                                    .message(&format!("layer {l}: router gini {g:.3} (target {:.3})", prof[pl].gini));
                                fits.push(RoutingFit {
                                    layer: *l,
                                    profile_layer: pl,
                                    target_gini: prof[pl].gini,
                                    target_top20: prof[pl].top20,
                                    achieved_gini: g,
                                    achieved_top20: t20,
                                    spread: s,
                                });
                                Some(f)
                            }
                            _ => None,
                        };
                        put_linear(&mut wout, &out, seed, base, shape, factors.as_deref())?;
                    }
                    Item::Vector { name, shape, init } => {
                        let n: usize = shape.iter().product();
                        let v = vector_values(seed, name, n, *init);
                        wout.put_with(&out, name.clone(), "F32", shape.clone(), n * 4, None, |b| {
                            for (c, x) in b.chunks_exact_mut(4).zip(&v) {
                                c.copy_from_slice(&x.to_le_bytes());
                            }
                        })?;
                    }
                }
            }
            wout.flush(&out)?;
            let stride = layout.stride as usize;
            let per_batch = ((64usize << 20) / stride).max(1);
            for l in 0..layers {
                progress.message(&format!("layer {}/{layers}", l + 1));
                let rel = expert_file_name(l);
                out.send(Msg::Open(partial.join(&rel)))?;
                let mut sums = Vec::with_capacity(d.num_experts);
                for b0 in (0..d.num_experts).step_by(per_batch) {
                    let n = per_batch.min(d.num_experts - b0);
                    let mut buf = out.buffer();
                    buf.resize(n * stride, 0);
                    let hashes: Vec<String> = buf
                        .par_chunks_mut(stride)
                        .enumerate()
                        .map(|(i, blob)| gen_expert(blob, &layout, seed, l, b0 + i))
                        .collect();
                    sums.extend(hashes);
                    out.send(Msg::Data(buf))?;
                }
                expert_files.push(ExpertFile {
                    layer: l,
                    file: rel,
                    num_experts: d.num_experts,
                    stride: layout.stride,
                    blob_bytes: layout.blob_bytes,
                    components: layout.components.clone(),
                    xxh3: sums,
                });
            }
            Ok(())
        })();
        drop(out);
        let wr = w.join().expect("writer thread panicked");
        (r, wr)
    });
    // The writer's error explains a generator that stopped because the writer went away.
    write_result?;
    gen_result?;
    if cancelled.load(Ordering::SeqCst) {
        return Err(Error::input("synth cancelled"));
    }
    let non_expert_bytes = wout.end();

    let mut copied = Vec::new();
    if let Some(dir) = &opts.tokenizer_from {
        for f in COPIED_FILES {
            let from = dir.join(f);
            if from.is_file() {
                std::fs::copy(&from, partial.join(f)).map_err(|e| Error::file(&from, format!("cannot copy: {e}")))?;
                copied.push(f.to_string());
            }
        }
    }
    let mut config = config_json;
    config["flashmoe_synth"] = json!({
        "geometry": opts.geometry.name(),
        "seed": opts.seed,
        "expert_bits": opts.expert_bits,
        "bits": opts.bits,
        "routing_like": opts.routing_like.as_ref().map(|p| p.display().to_string()),
    });
    let cfg_out = partial.join("config.json");
    std::fs::write(&cfg_out, serde_json::to_string_pretty(&config).unwrap()).map_err(io_err(&cfg_out))?;
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        layout: flashmoe::packed::TensorLayout::Canonical,
        config: config.clone(),
        source: format!(
            "synth:{} seed={} layers={layers} expert_bits={} bits={}{}",
            opts.geometry,
            opts.seed,
            opts.expert_bits,
            opts.bits,
            opts.routing_like.as_ref().map(|p| format!(" routing_like={}", p.display())).unwrap_or_default()
        ),
        created_by: format!("flashmoe {}", env!("CARGO_PKG_VERSION")),
        weights_file: WEIGHTS_FILE.into(),
        tensors: wout.entries,
        experts: expert_files,
        copied_files: copied.clone(),
    };
    flashmoe::convert::finish_output(&partial, dst, &manifest)?;
    let seconds = t0.elapsed().as_secs_f64();
    let total = non_expert_bytes + expert_bytes;
    Ok(SynthReport {
        dst: dst.clone(),
        config,
        non_expert_bytes,
        expert_bytes,
        seconds,
        bytes_per_sec: total as f64 / seconds.max(1e-9),
        routing: fits,
        copied_files: copied,
    })
}
