//! ExpertStore: fetches the routed experts of a layer from the packed per-layer files with
//! parallel positioned reads (a dedicated pool, so several reads are in flight: NVMe needs queue
//! depth), through the page cache or with O_DIRECT, behind a RAM cache tier. Compute never sees
//! files: it gets `ExpertWeights` views over the fetched buffers.

use super::buffer::{AlignedBuf, BufPool};
use super::cache::{CachePolicy, ExpertCache};
use super::weights::ExpertWeights;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::packed::{ExpertFile, Manifest, TensorEntry, parse_dtype};
use crate::weights::Linear;
use crate::weights::store::{ByteSource, Bytes, RawTensor};
use flashmoe_kernels::ggml::GgmlType;
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Buffered reads through the OS page cache.
    Page,
    /// O_DIRECT: straight from the device into our buffers, no page-cache copy or pollution.
    Direct,
}

impl IoMode {
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Page => "page",
            IoMode::Direct => "direct",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoChoice {
    Page,
    Direct,
    /// Page when the experts fit in available RAM; otherwise measure both on a few experts at
    /// start and take O_DIRECT only when it is clearly faster (`choose_auto_io`).
    Auto,
    /// No reads at all: compute on views of the mapped expert files (the page cache is the RAM
    /// tier; no copy per token, no RAM tier of our own, no routing counts). The model loader
    /// handles it (`LoadOptions::stream_experts` off); a store opened with it reads as `Page`.
    Mmap,
}

impl std::str::FromStr for IoChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "page" => Ok(IoChoice::Page),
            "direct" => Ok(IoChoice::Direct),
            "auto" => Ok(IoChoice::Auto),
            "mmap" => Ok(IoChoice::Mmap),
            o => Err(format!("`{o}`: expected page, direct, mmap or auto")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub io: IoChoice,
    pub ram_cache_bytes: u64,
    /// Reads in flight at once.
    pub io_threads: usize,
    pub cache_policy: CachePolicy,
    /// Check each expert of a packed model against its manifest checksum the first time it is
    /// read from disk (a damaged file is an error naming the expert, not fluent wrong text).
    pub verify: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            io: IoChoice::Page,
            ram_cache_bytes: 0,
            io_threads: 8,
            cache_policy: CachePolicy::LfuAging { half_life: 32.0 },
            verify: true,
        }
    }
}

/// The files a scattered store reads experts from in place (a safetensors folder's shards, or a
/// GGUF model's parts), and how to tell which file a mapped byte range belongs to.
pub struct ScatteredFiles<'a> {
    /// The model folder (or GGUF file), for messages.
    pub dir: &'a Path,
    pub paths: &'a [PathBuf],
    pub file_of: &'a dyn Fn(&Bytes) -> Option<usize>,
    /// "safetensors" or "GGUF", for the I/O mode note.
    pub kind: &'a str,
}

/// Counters since the store was opened (read them before and after to get a window).
#[derive(Default, Debug)]
pub struct IoStats {
    pub disk_bytes: AtomicU64,
    pub disk_reads: AtomicU64,
    pub read_nanos: AtomicU64,
    pub ram_hits: AtomicU64,
    pub ram_misses: AtomicU64,
    /// Time callers spent blocked in `fetch` (I/O not hidden behind compute).
    pub wait_nanos: AtomicU64,
    /// Speculative reads started by `prefetch`, and how many of them a fetch then used.
    pub prefetch_issued: AtomicU64,
    pub prefetch_used: AtomicU64,
    /// Experts moved out of the RAM tier to the GPU (exclusive tiers), and experts the GPU
    /// evicted into it.
    pub ram_taken: AtomicU64,
    pub ram_admitted: AtomicU64,
    /// Experts the background pre-warm read into the tiers.
    pub prewarmed: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IoSnapshot {
    pub disk_bytes: u64,
    pub disk_reads: u64,
    pub read_secs: f64,
    pub ram_hits: u64,
    pub ram_misses: u64,
    pub wait_secs: f64,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    pub ram_taken: u64,
    pub ram_admitted: u64,
    pub prewarmed: u64,
}

impl IoSnapshot {
    pub fn since(&self, before: &IoSnapshot) -> IoSnapshot {
        IoSnapshot {
            disk_bytes: self.disk_bytes - before.disk_bytes,
            disk_reads: self.disk_reads - before.disk_reads,
            read_secs: self.read_secs - before.read_secs,
            ram_hits: self.ram_hits - before.ram_hits,
            ram_misses: self.ram_misses - before.ram_misses,
            wait_secs: self.wait_secs - before.wait_secs,
            prefetch_issued: self.prefetch_issued - before.prefetch_issued,
            prefetch_used: self.prefetch_used - before.prefetch_used,
            ram_taken: self.ram_taken - before.ram_taken,
            ram_admitted: self.ram_admitted - before.ram_admitted,
            prewarmed: self.prewarmed - before.prewarmed,
        }
    }
    pub fn ram_hit_rate(&self) -> f64 {
        let n = self.ram_hits + self.ram_misses;
        if n == 0 { 0.0 } else { self.ram_hits as f64 / n as f64 }
    }
}

/// What `--io auto` decides from (besides a measurement).
#[derive(Clone, Copy, Debug)]
pub struct AutoIoFacts {
    /// Bytes of all the routed experts on disk.
    pub expert_bytes: u64,
    /// The budget of our own RAM tier: memory the page cache will not have.
    pub ram_cache_bytes: u64,
    /// Memory the kernel says is available for new use (`MemAvailable`), when known.
    pub available_ram: Option<u64>,
}

/// Read rates (bytes/s) of cold-expert samples in each mode.
#[derive(Clone, Debug, Default)]
pub struct IoSamples {
    pub page: Vec<f64>,
    pub direct: Vec<f64>,
}

/// Samples per mode that `--io auto` measures when the experts do not fit in RAM.
pub const AUTO_IO_ROUNDS: usize = 3;

/// How much faster than page reads O_DIRECT must measure (median against median) for `auto` to
/// pick it: the sample reads cold experts only, while page reads also get the repeats the page
/// cache keeps, and on a loaded machine one noisy sample must not decide.
pub const AUTO_DIRECT_MARGIN: f64 = 1.25;

/// How long the store must go without a fetch before RAM-tier entries move into pinned memory
/// (`set_host_memory`): a decode step fetches every few milliseconds.
pub const PIN_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

/// The half of the `--io auto` rule that needs no measurement: `Ok(reason)` when the experts fit
/// in the RAM left next to our own RAM tier (page mode, then), else `Err(why not)`.
pub fn auto_io_fit(facts: &AutoIoFacts) -> std::result::Result<String, String> {
    let fmt = crate::units::fmt_bytes;
    let Some(room) = facts.available_ram.map(|a| a.saturating_sub(facts.ram_cache_bytes)) else {
        return Err("available RAM unknown".to_string());
    };
    if facts.expert_bytes > room {
        return Err(format!("the experts ({}) exceed available RAM ({})", fmt(facts.expert_bytes), fmt(room)));
    }
    let tier = if facts.ram_cache_bytes > 0 {
        format!(" beside the {} RAM tier", fmt(facts.ram_cache_bytes))
    } else {
        String::new()
    };
    Ok(format!(
        "the experts ({}) fit in available RAM ({}){tier}, so the page cache keeps them after their first read",
        fmt(facts.expert_bytes),
        fmt(room)
    ))
}

/// The `--io auto` rule. When every expert fits in the RAM left next to our own RAM tier, the
/// page cache keeps them after their first read and page mode serves repeats from memory, which
/// O_DIRECT never does: page, without measuring. Otherwise `measure` is called and O_DIRECT wins
/// only when its median rate beats the page median by `AUTO_DIRECT_MARGIN`. Returns the mode and
/// the reason, one line (`page (auto: …)`).
pub fn choose_auto_io(facts: &AutoIoFacts, measure: impl FnOnce() -> IoSamples) -> (IoMode, String) {
    let why = match auto_io_fit(facts) {
        Ok(reason) => return (IoMode::Page, format!("page (auto: {reason})")),
        Err(why) => why,
    };
    let s = measure();
    let (page, direct) = (median(&s.page), median(&s.direct));
    let mode = if direct >= AUTO_DIRECT_MARGIN * page { IoMode::Direct } else { IoMode::Page };
    let verdict = if mode == IoMode::Direct { "at least" } else { "less than" };
    (
        mode,
        format!(
            "{} (auto: {why}; median of {} cold samples: direct {:.2} GB/s, page {:.2} GB/s, {verdict} the {AUTO_DIRECT_MARGIN}× direct needs)",
            mode.name(),
            s.page.len().min(s.direct.len()),
            direct / 1e9,
            page / 1e9
        ),
    )
}

/// Median of a few rates (0 for none): unlike the best or the mean, one sample slowed or sped
/// up by other load on the machine does not move it.
fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

/// `MemAvailable` of /proc/meminfo in bytes: memory new work can use without swapping (free
/// memory plus reclaimable page cache). `None` where the file is absent (not Linux).
pub fn available_ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// One contiguous piece of an expert scattered over safetensors files: `len` bytes at `offset`
/// of source file `file`, going to `dst` in the expert's buffer.
#[derive(Clone, Debug)]
struct Piece {
    file: usize,
    offset: u64,
    len: usize,
    dst: usize,
}

/// What a fetch does with the RAM tier: a plain fetch keeps what it reads there; a take moves
/// RAM hits out of it (to the tier above); a borrow leaves RAM hits in place. Take and borrow
/// do not add disk reads to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fetch {
    Cache,
    Take,
    Borrow,
}

struct LayerFile {
    path: PathBuf,
    /// Packed models: the layer's expert file.
    page: Option<File>,
    direct: Option<File>,
    /// HF/MLX folders: per expert, the pieces to read from `ExpertStore::sources`.
    pieces: Option<Vec<Vec<Piece>>>,
    stride: u64,
    blob_bytes: u64,
    num_experts: usize,
    components: Vec<TensorEntry>,
    /// Packed models: xxh3-64 of each expert's whole stride (the manifest's), and whether it has
    /// been checked since open.
    sums: Vec<u64>,
    checked: Vec<std::sync::atomic::AtomicBool>,
}

/// Where a pre-warm hands the experts of the tier above (the GPU) over: (layer, expert) and
/// its buffer.
pub type UpperFeed = std::sync::mpsc::SyncSender<PrewarmItem>;

/// One pre-warmed expert for a tier above: its key, its buffer, its profiled rate (the score
/// it gets if that tier cannot take it and it goes to the RAM tier instead).
pub type PrewarmItem = ((u32, u32), Arc<AlignedBuf>, f64);

/// The receiving end of an [`UpperFeed`].
pub type PrewarmRx = std::sync::mpsc::Receiver<PrewarmItem>;

/// An expert read started ahead of need (`prefetch`), filled in by an I/O thread.
#[derive(Default)]
struct Slot {
    value: Mutex<Option<std::result::Result<Arc<AlignedBuf>, String>>>,
    ready: std::sync::Condvar,
}

impl Slot {
    fn wait(&self) -> std::result::Result<Arc<AlignedBuf>, String> {
        let mut v = self.value.lock().unwrap();
        while v.is_none() {
            v = self.ready.wait(v).unwrap();
        }
        v.clone().expect("checked above")
    }
}

pub struct ExpertStore {
    /// Source files of scattered experts (HF/MLX folders).
    sources: Vec<(PathBuf, File)>,
    pending: Mutex<std::collections::HashMap<(u32, u32), Arc<Slot>>>,
    layers: Vec<LayerFile>,
    mode: IoMode,
    /// How the mode was chosen, for the start-up plan.
    pub mode_note: String,
    cache: Mutex<ExpertCache>,
    /// Recycled read buffers (see buffer.rs for why).
    bufs: Arc<BufPool>,
    /// Fetch calls so far (÷ layers ≈ tokens: the clock of LFU aging).
    fetches: AtomicU64,
    pool: rayon::ThreadPool,
    pub stats: IoStats,
    hidden: usize,
    intermediate: usize,
    /// Routed uses per (layer, expert) since open: `uses[layer · num_experts + expert]`.
    uses: Vec<AtomicU64>,
    num_experts: usize,
    /// Set to end a running pre-warm early (the model is going away).
    prewarm_stop: std::sync::atomic::AtomicBool,
    /// Experts handed to the tier above (`take`, pre-warm hand-overs) and not given back
    /// (`admit`): in an exclusive hierarchy their home is up there, so the pre-warm does not
    /// also put them in RAM. (May hold a few that the tier above dropped; those are then read
    /// on first use.)
    handed_up: Mutex<std::collections::HashSet<(u32, u32)>>,
    /// The pool's heap-allocation count when the thread that moves RAM-tier entries into host
    /// memory last found none left (`set_host_memory`).
    pinned_seen: AtomicU64,
    /// When the store opened, and the last fetch (nanoseconds after that).
    opened: Instant,
    last_fetch: AtomicU64,
    /// Per layer, the layout of its expert blobs (made at open from a zero buffer).
    templates: Vec<super::weights::ExpertTemplate>,
}

impl ExpertStore {
    pub fn open(dir: &Path, manifest: &Manifest, cfg: &ModelConfig, opts: &StoreOptions) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, ef) in manifest.experts.iter().enumerate() {
            if ef.layer != i {
                return Err(Error::file(
                    dir.join(crate::packed::MANIFEST),
                    format!("expert file {} is for layer {}, expected {i}", ef.file, ef.layer),
                ));
            }
            let path = dir.join(&ef.file);
            let page = flashmoe_text::file::open_regular(&path).map_err(|e| Error::io(&path, e))?;
            let len = page.metadata().map_err(|e| Error::io(&path, e))?.len();
            if len != ef.stride * ef.num_experts as u64 {
                return Err(Error::file(
                    &path,
                    format!(
                        "has {len} bytes, expected {} experts × {} (truncated or mismatched file)",
                        ef.num_experts, ef.stride
                    ),
                ));
            }
            if ef.num_experts != cfg.num_experts {
                return Err(Error::file(
                    &path,
                    format!("holds {} experts but config.json says {}", ef.num_experts, cfg.num_experts),
                ));
            }
            let sums = if opts.verify {
                if ef.xxh3.len() != ef.num_experts {
                    return Err(Error::file(
                        dir.join(crate::packed::MANIFEST),
                        format!("layer {i} lists {} checksums for {} experts", ef.xxh3.len(), ef.num_experts),
                    ));
                }
                ef.xxh3
                    .iter()
                    .map(|h| u64::from_str_radix(h, 16))
                    .collect::<std::result::Result<Vec<u64>, _>>()
                    .map_err(|_| {
                        Error::file(dir.join(crate::packed::MANIFEST), format!("layer {i}: malformed expert checksum"))
                    })?
            } else {
                Vec::new()
            };
            // O_DIRECT is refused by some filesystems (tmpfs); then direct mode is unavailable.
            let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).ok();
            layers.push(LayerFile {
                path,
                page: Some(page),
                direct,
                pieces: None,
                stride: ef.stride,
                blob_bytes: ef.blob_bytes,
                num_experts: ef.num_experts,
                components: ef.components.clone(),
                checked: (0..sums.len()).map(|_| Default::default()).collect(),
                sums,
            });
        }
        if layers.len() != cfg.num_layers {
            return Err(Error::file(
                dir.join(crate::packed::MANIFEST),
                format!("lists expert files for {} layers, config.json has {}", layers.len(), cfg.num_layers),
            ));
        }
        Self::finish(layers, Vec::new(), cfg, opts)
    }

    /// A store over the experts of an HF/MLX safetensors folder or a GGUF model: each expert is
    /// read as the few byte ranges it occupies in the checkpoint files (no conversion needed;
    /// page-cache reads, since those ranges are not block-aligned).
    pub fn open_scattered(
        files: &ScatteredFiles<'_>,
        experts: &[&[ExpertWeights]],
        cfg: &ModelConfig,
        opts: &StoreOptions,
    ) -> Result<Self> {
        let mut sources = Vec::new();
        for path in files.paths {
            sources.push((path.clone(), flashmoe_text::file::open_regular(path).map_err(|e| Error::io(path, e))?));
        }
        let mut layers = Vec::new();
        for (l, list) in experts.iter().enumerate() {
            let mut components: Vec<TensorEntry> = Vec::new();
            let mut all = Vec::with_capacity(list.len());
            let mut blob = 0usize;
            for (e, ex) in list.iter().enumerate() {
                let mut pieces = Vec::new();
                let mut dst = 0usize;
                let mut comps = Vec::new();
                for (proj, lin) in [("gate_proj", &ex.gate), ("up_proj", &ex.up), ("down_proj", &ex.down)] {
                    let stored = lin.stored_pieces().ok_or_else(|| {
                        Error::input(format!("layer {l} expert {e} {proj}: not one stored row range; cannot stream"))
                    })?;
                    for (suffix, dtype, shape, bytes) in stored {
                        let file = (files.file_of)(&bytes).ok_or_else(|| {
                            Error::input(format!("layer {l} expert {e} {proj}: bytes are not from a checkpoint file"))
                        })?;
                        dst = dst.next_multiple_of(64);
                        pieces.push(Piece { file, offset: bytes.start() as u64, len: bytes.len(), dst });
                        comps.push(TensorEntry {
                            name: format!("{proj}.{suffix}"),
                            dtype: dtype.to_string(),
                            shape,
                            offset: dst as u64,
                            nbytes: bytes.len() as u64,
                            quant: None,
                            xxh3: None,
                        });
                        dst += bytes.len();
                    }
                }
                if e == 0 {
                    components = comps;
                    blob = dst;
                } else if dst != blob
                    || comps
                        .iter()
                        .zip(&components)
                        .any(|(a, b)| a.offset != b.offset || a.shape != b.shape || a.dtype != b.dtype)
                {
                    return Err(Error::input(format!("layer {l}: expert {e} is stored differently from expert 0")));
                }
                all.push(pieces);
            }
            layers.push(LayerFile {
                path: files.dir.to_path_buf(),
                page: None,
                direct: None,
                pieces: Some(all),
                stride: (blob as u64).next_multiple_of(4096),
                blob_bytes: blob as u64,
                num_experts: list.len(),
                components,
                sums: Vec::new(),
                checked: Vec::new(),
            });
        }
        let mut store = Self::finish(layers, sources, cfg, &StoreOptions { io: IoChoice::Page, ..opts.clone() })?;
        store.mode_note = match opts.io {
            IoChoice::Direct => "page (O_DIRECT needs a packed model: `flashmoe convert`)".into(),
            _ => format!("page (experts read in place from the {} files)", files.kind),
        };
        Ok(store)
    }

    fn finish(
        layers: Vec<LayerFile>,
        sources: Vec<(PathBuf, File)>,
        cfg: &ModelConfig,
        opts: &StoreOptions,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.io_threads.max(1))
            .thread_name(|i| format!("flashmoe-io-{i}"))
            .build()
            .map_err(|e| Error::input(format!("cannot start I/O threads: {e}")))?;
        // Enough free buffers for two rounds of reads in flight.
        let pool_bytes = 2 * opts.io_threads.max(1) * layers.iter().map(|l| l.stride as usize).max().unwrap_or(0);
        let mut store = ExpertStore {
            sources,
            pending: Mutex::new(Default::default()),
            layers,
            mode: IoMode::Page,
            mode_note: String::new(),
            cache: Mutex::new(ExpertCache::with_policy(opts.ram_cache_bytes, opts.cache_policy)),
            bufs: BufPool::new(pool_bytes),
            fetches: AtomicU64::new(0),
            pool,
            stats: IoStats::default(),
            hidden: cfg.hidden_size,
            intermediate: cfg.moe_intermediate,
            uses: (0..cfg.num_layers * cfg.num_experts).map(|_| AtomicU64::new(0)).collect(),
            num_experts: cfg.num_experts,
            prewarm_stop: Default::default(),
            handed_up: Default::default(),
            pinned_seen: AtomicU64::new(0),
            opened: Instant::now(),
            last_fetch: AtomicU64::new(0),
            templates: Vec::new(),
        };
        // Build one expert from a zero buffer now, so layout problems surface at load time; it
        // is the layer's template for every fetch after (the zero buffer is not kept).
        for l in 0..store.layers.len() {
            let w = store.expert_weights(l, Arc::new(AlignedBuf::zeroed(store.layers[l].stride as usize)))?;
            store.templates.push(super::weights::ExpertTemplate::of(&w));
        }
        let direct_ok = store.layers.iter().all(|l| l.direct.is_some());
        store.mode_note = match opts.io {
            IoChoice::Page | IoChoice::Mmap => "page (requested)".into(),
            IoChoice::Direct if direct_ok => {
                store.mode = IoMode::Direct;
                "direct (requested)".into()
            }
            IoChoice::Direct => {
                return Err(Error::input("--io direct: this filesystem refuses O_DIRECT (try --io page)"));
            }
            IoChoice::Auto if !direct_ok => "page (auto: O_DIRECT unsupported here)".into(),
            IoChoice::Auto => {
                let facts = AutoIoFacts {
                    expert_bytes: store.total_expert_bytes(),
                    ram_cache_bytes: opts.ram_cache_bytes,
                    available_ram: available_ram_bytes(),
                };
                let (mode, note) = choose_auto_io(&facts, || store.measure_modes());
                store.mode = mode;
                note
            }
        };
        Ok(store)
    }

    pub fn mode(&self) -> IoMode {
        self.mode
    }

    pub fn cache_policy(&self) -> CachePolicy {
        self.cache.lock().unwrap().policy()
    }

    pub fn ram_cache_budget(&self) -> u64 {
        self.cache.lock().unwrap().budget()
    }

    /// Bytes one expert occupies in a buffer (the 4 KiB stride).
    pub fn expert_stride(&self, layer: usize) -> u64 {
        self.layers[layer].stride
    }

    /// Bytes of one layer's expert file.
    pub fn layer_bytes(&self, layer: usize) -> u64 {
        let l = &self.layers[layer];
        l.stride * l.num_experts as u64
    }

    /// Routed experts per layer.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn total_expert_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.stride * l.num_experts as u64).sum()
    }

    /// Reads samples of experts in each mode, alternating page and direct for
    /// `AUTO_IO_ROUNDS` rounds (different experts each time, so every sample is a cold read),
    /// and returns the bytes/s of each sample.
    fn measure_modes(&self) -> IoSamples {
        let l = self.layers.len() / 2;
        let n = self.layers[l].num_experts;
        let samples = 2 * AUTO_IO_ROUNDS;
        // About 8 MiB per sample (at least 8 reads) so timer noise does not decide.
        let hi = (n / samples).max(1) as u64;
        let k = ((8u64 << 20) / self.layers[l].stride.max(1)).clamp(8.min(hi), hi) as usize;
        let rate = |mode: IoMode, first: usize| {
            let ids: Vec<usize> = (0..k).map(|j| (first + j * 7919) % n).collect();
            let t = Instant::now();
            let bytes: u64 = self
                .pool
                .install(|| ids.par_iter().map(|&e| self.read(mode, l, e).map(|b| b.len() as u64).unwrap_or(0)).sum());
            bytes as f64 / t.elapsed().as_secs_f64().max(1e-9)
        };
        let mut out = IoSamples::default();
        for r in 0..AUTO_IO_ROUNDS {
            out.page.push(rate(IoMode::Page, (2 * r) * n / samples));
            out.direct.push(rate(IoMode::Direct, (2 * r + 1) * n / samples));
        }
        out
    }

    /// Reads expert `e` of `layer` into a free buffer or a new heap one (never a new pinned one:
    /// see `set_host_memory`).
    fn read(&self, mode: IoMode, layer: usize, e: usize) -> Result<AlignedBuf> {
        let lf = &self.layers[layer];
        let mut buf = self.bufs.get_fast(lf.stride as usize);
        let t = Instant::now();
        if let Some(pieces) = &lf.pieces {
            let mut n = 0;
            for p in &pieces[e] {
                let (path, f) = &self.sources[p.file];
                f.read_exact_at(&mut buf.as_mut_slice()[p.dst..p.dst + p.len], p.offset).map_err(|err| {
                    let end = p.offset + p.len as u64;
                    Error::file(path, format!("reading expert {e} of layer {layer} (bytes {}..{end}): {err}", p.offset))
                })?;
                n += p.len;
            }
            self.stats.read_nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
            self.stats.disk_bytes.fetch_add(n as u64, Relaxed);
            self.stats.disk_reads.fetch_add(pieces[e].len() as u64, Relaxed);
            return Ok(buf);
        }
        let off = e as u64 * lf.stride;
        let page = lf.page.as_ref().expect("packed layers have a file");
        // The first read of an expert is checked against its checksum, which covers the whole
        // stride (padding included).
        let check = lf.sums.get(e).filter(|_| !lf.checked[e].load(Relaxed));
        let (file, len) = match (mode, &lf.direct) {
            (IoMode::Direct, Some(f)) => (f, lf.stride as usize),
            _ if check.is_some() => (page, lf.stride as usize),
            // Buffered reads need not read the zero padding.
            _ => (page, lf.blob_bytes as usize),
        };
        file.read_exact_at(&mut buf.as_mut_slice()[..len], off).map_err(|err| {
            Error::file(&lf.path, format!("reading expert {e} (bytes {off}..{}): {err}", off + len as u64))
        })?;
        if let Some(&want) = check {
            let got = xxhash_rust::xxh3::xxh3_64(&buf.as_mut_slice()[..lf.stride as usize]);
            if got != want {
                return Err(Error::file(
                    &lf.path,
                    format!(
                        "expert {e} of layer {layer} (bytes {off}..{}) fails its checksum: the file is damaged (`flashmoe verify` checks the whole model; --no-verify skips this check)",
                        off + lf.stride
                    ),
                ));
            }
            lf.checked[e].store(true, Relaxed);
        }
        self.stats.read_nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        self.stats.disk_bytes.fetch_add(len as u64, Relaxed);
        self.stats.disk_reads.fetch_add(1, Relaxed);
        Ok(buf)
    }

    /// Whether the RAM tier holds expert `e` of `layer` (not counted as a use).
    pub fn in_ram(&self, layer: usize, e: usize) -> bool {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).contains((layer as u32, e as u32))
    }

    /// The buffers of experts `ids` of `layer`, from the RAM cache or read in parallel.
    pub fn fetch(&self, layer: usize, ids: &[usize]) -> Result<Vec<Arc<AlignedBuf>>> {
        self.fetch_into(layer, ids, Fetch::Cache).map(|v| v.into_iter().map(|(b, _)| b).collect())
    }

    /// For a tier above this one (a GPU cache) in an exclusive hierarchy: the buffers of experts
    /// `ids`, each with whether it came from the RAM tier. Experts found in RAM leave it (their
    /// new home is the caller's tier); experts read from disk are not added to it.
    pub fn take(&self, layer: usize, ids: &[usize]) -> Result<Vec<(Arc<AlignedBuf>, bool)>> {
        self.fetch_into(layer, ids, Fetch::Take)
    }

    /// For a tier above this one that holds experts only for one pass and then lets them go (a
    /// long prefill in an exclusive hierarchy): the buffers of experts `ids`, each with whether
    /// it came from the RAM tier. Experts found in RAM stay there (the tier above can drop its
    /// copy instead of copying it back); experts read from disk are not added to it.
    pub fn borrow(&self, layer: usize, ids: &[usize]) -> Result<Vec<(Arc<AlignedBuf>, bool)>> {
        self.fetch_into(layer, ids, Fetch::Borrow)
    }

    /// Counts routed uses of experts `ids` of `layer` that reached this store's owner without a
    /// fetch (hits in a GPU tier), so the routing profile sees every use.
    pub fn note_uses(&self, layer: usize, ids: impl IntoIterator<Item = usize>) {
        for e in ids {
            if let Some(u) = self.uses.get(layer * self.num_experts + e) {
                u.fetch_add(1, Relaxed);
            }
        }
    }

    /// Routed uses counted since the store opened.
    pub fn profile(&self) -> super::RoutingProfile {
        let n = self.num_experts.max(1);
        super::RoutingProfile {
            counts: self.uses.chunks(n).map(|c| c.iter().map(|u| u.load(Relaxed)).collect()).collect(),
        }
    }

    /// Puts an expert the tier above evicted into the RAM tier (exclusive hierarchy: it is not
    /// here yet). Returns whether the RAM tier kept it.
    pub fn admit(&self, layer: usize, e: usize, buf: AlignedBuf) -> bool {
        self.admit_shared(layer, e, Arc::new(buf), None)
    }

    /// [`Self::admit`] for a buffer that may still be shared, scored at `rate` when given (a
    /// pre-warm read handed to a tier above that had no room for it by then: like the RAM
    /// tier's own pre-warm, it displaces only colder entries).
    pub fn admit_shared(&self, layer: usize, e: usize, buf: Arc<AlignedBuf>, rate: Option<f64>) -> bool {
        let key = (layer as u32, e as u32);
        self.handed_up.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.budget() == 0 {
            return false;
        }
        match rate {
            Some(r) => {
                if !c.contains(key) && c.insert_seeded(key, buf, r).is_err() {
                    return false;
                }
            }
            None => c.insert(key, buf),
        }
        let kept = c.contains(key);
        if kept {
            self.stats.ram_admitted.fetch_add(1, Relaxed);
        }
        kept
    }

    /// Expert buffers can live in `mem` from now on (a GPU backend's pinned host memory: RAM
    /// tier entries it can copy by DMA with no staging). Reads still go to free buffers or the
    /// heap: allocating pinned memory takes milliseconds per expert and stalls the GPU's driver
    /// meanwhile (measured: 12–22 ms steps, a prefill at half speed). A background thread moves
    /// RAM-tier entries into `mem` instead, only while the store is idle (no fetch for
    /// [`PIN_IDLE`]), for as long as the store lives. `eager`: reads allocate in `mem` at once
    /// (slower reads and steps, but every entry is in `mem` from its first read: for runs that
    /// force a PCIe share, tests and benchmarks).
    pub fn set_host_memory(self: &Arc<Self>, mem: Arc<dyn super::buffer::HostMemory>, eager: bool) {
        self.bufs.set_host_memory(mem, eager);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("flashmoe-pin".into()).spawn(move || {
            loop {
                std::thread::sleep(PIN_IDLE);
                let Some(me) = weak.upgrade() else { return };
                // Moved in rounds of 16 (the cache lock is held only to find them); the count
                // is taken as seen once a round finds nothing.
                while me.idle_for() >= PIN_IDLE {
                    let made = me.bufs.heap_allocations();
                    if made == me.pinned_seen.load(Relaxed) {
                        break;
                    }
                    if me.move_heap_entries(16) == 0 {
                        me.pinned_seen.store(made, Relaxed);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("no thread to move RAM-tier experts into pinned memory: {e}");
        }
    }

    /// Whether RAM-tier entries wait to move into the pool's host memory (which happens only
    /// while the store is idle: a benchmark waits for it, as for the pre-warm).
    pub fn settling(&self) -> bool {
        self.bufs.heap_allocations() != self.pinned_seen.load(Relaxed)
    }

    /// Time since the last fetch.
    fn idle_for(&self) -> std::time::Duration {
        let last = self.last_fetch.load(Relaxed);
        self.opened.elapsed().saturating_sub(std::time::Duration::from_nanos(last))
    }

    /// Copies up to `max` RAM-tier entries that live on the heap into buffers of the pool's
    /// host memory and swaps them in (their scores unchanged; an entry that left or changed
    /// meanwhile is skipped). Returns how many were found.
    pub fn move_heap_entries(&self, max: usize) -> usize {
        let todo =
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).entries_where(|b| b.host_memory().is_none(), max);
        for (key, old) in &todo {
            if self.idle_for() < PIN_IDLE {
                // A pass started: found some, moved them later.
                break;
            }
            let Some(mut new) = self.bufs.get_in_host_memory(old.len()) else { return 0 };
            new.as_mut_slice().copy_from_slice(ByteSource::bytes(&**old));
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.replace_if(*key, Arc::new(new), |cur| Arc::ptr_eq(cur, old));
        }
        todo.len()
    }

    /// The kind of host memory new expert buffers come from, when not the heap.
    pub fn host_memory(&self) -> Option<&'static str> {
        self.bufs.host_memory()
    }

    /// A buffer the size of one expert of `layer` (for `admit`), recycled when one is free.
    pub fn expert_buffer(&self, layer: usize) -> AlignedBuf {
        self.bufs.get_fast(self.layers[layer].stride as usize)
    }

    /// Byte ranges of expert data inside a buffer of `layer` (the blob without padding).
    pub fn blob_bytes(&self, layer: usize) -> usize {
        self.layers[layer].blob_bytes as usize
    }

    fn fetch_into(&self, layer: usize, ids: &[usize], how: Fetch) -> Result<Vec<(Arc<AlignedBuf>, bool)>> {
        self.last_fetch.store(self.opened.elapsed().as_nanos() as u64, Relaxed);
        let take = how == Fetch::Take;
        // Disk reads go into the RAM tier only for a plain fetch.
        let keep_reads = how == Fetch::Cache;
        self.note_uses(layer, ids.iter().copied());
        let t = Instant::now();
        let mut out: Vec<Option<(Arc<AlignedBuf>, bool)>> = vec![None; ids.len()];
        let mut missing = Vec::new();
        {
            let mut c = self.cache.lock().unwrap();
            let n = self.fetches.fetch_add(1, Relaxed) + 1;
            c.set_clock(n as f64 / self.layers.len().max(1) as f64);
            for (j, &e) in ids.iter().enumerate() {
                let key = (layer as u32, e as u32);
                let found = if take { c.remove(key) } else { c.get(key) };
                match found {
                    Some(b) => out[j] = Some((b, true)),
                    None => missing.push(j),
                }
            }
        }
        if take {
            self.stats.ram_taken.fetch_add((ids.len() - missing.len()) as u64, Relaxed);
            self.handed_up
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ids.iter().map(|&e| (layer as u32, e as u32)));
        }
        self.stats.ram_hits.fetch_add((ids.len() - missing.len()) as u64, Relaxed);
        self.stats.ram_misses.fetch_add(missing.len() as u64, Relaxed);
        // Reads a prefetch already started: take them over; drop this layer's unused guesses.
        let mut prefetched = Vec::new();
        {
            let mut p = self.pending.lock().unwrap();
            missing.retain(|&j| match p.remove(&(layer as u32, ids[j] as u32)) {
                Some(slot) => {
                    prefetched.push((j, slot));
                    false
                }
                None => true,
            });
            p.retain(|k, _| k.0 != layer as u32);
        }
        for (j, slot) in prefetched {
            let b = slot.wait().map_err(Error::Input)?;
            self.stats.prefetch_used.fetch_add(1, Relaxed);
            if keep_reads {
                self.cache.lock().unwrap().insert((layer as u32, ids[j] as u32), b.clone());
            }
            out[j] = Some((b, false));
        }
        if !missing.is_empty() {
            let read: Vec<Result<AlignedBuf>> =
                self.pool.install(|| missing.par_iter().map(|&j| self.read(self.mode, layer, ids[j])).collect());
            let mut c = self.cache.lock().unwrap();
            for (&j, r) in missing.iter().zip(read) {
                let b = Arc::new(r?);
                if keep_reads {
                    c.insert((layer as u32, ids[j] as u32), b.clone());
                }
                out[j] = Some((b, false));
            }
        }
        self.stats.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        Ok(out.into_iter().map(|b| b.expect("filled above")).collect())
    }

    /// Fills the tiers in the background, hottest first (`keys`, from a routing profile): the
    /// first `to_upper` experts go to the tier above through `upper` (a bounded channel the GPU
    /// drains between steps), the rest into the RAM tier, each scored at its profiled rate
    /// (`keys`' second field, uses per token) so it displaces only entries that score lower,
    /// never what the run uses more. Reads are batched and issued in file order within a batch.
    /// Returns at once.
    pub fn start_prewarm(
        self: &Arc<Self>,
        keys: Vec<((u32, u32), f64)>,
        upper: Option<UpperFeed>,
        to_upper: usize,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("flashmoe-prewarm".into())
            .spawn(move || me.prewarm(keys, upper, to_upper))
            .expect("spawning a thread")
    }

    /// Ends a running pre-warm after its current batch.
    pub fn stop_prewarm(&self) {
        self.prewarm_stop.store(true, Relaxed);
    }

    fn prewarm(&self, keys: Vec<((u32, u32), f64)>, upper: Option<UpperFeed>, to_upper: usize) {
        let batch = self.pool.current_num_threads().max(1) * 2;
        let (up_keys, ram_keys) = keys.split_at(if upper.is_some() { to_upper.min(keys.len()) } else { 0 });
        let valid =
            |&((l, e), _): &((u32, u32), f64)| (l as usize) < self.layers.len() && (e as usize) < self.num_experts;
        let mut ram_keys: Vec<((u32, u32), f64)> = ram_keys.iter().copied().filter(valid).collect();
        // Experts for the tier above: read (not cached here) and handed over in order. When it
        // stops taking them (full: on-demand loads filled it first), this expert and every one
        // after it belong to RAM: the ones already read go in now, the rest join the RAM list
        // in front (they are the hottest), so none is left for a disk read on first use.
        if let Some(tx) = upper {
            let ups: Vec<((u32, u32), f64)> = up_keys.iter().copied().filter(valid).collect();
            let mut done = 0;
            'upper: for chunk in ups.chunks(batch) {
                if self.prewarm_stop.load(Relaxed) {
                    return;
                }
                let mut sorted: Vec<((u32, u32), f64)> = chunk.to_vec();
                sorted.sort_unstable_by_key(|&(k, _)| k);
                let read: Vec<_> = self.pool.install(|| {
                    sorted
                        .par_iter()
                        .map(|&(k, rate)| (k, rate, self.read(self.mode, k.0 as usize, k.1 as usize)))
                        .collect()
                });
                let mut read = read.into_iter();
                while let Some((key, rate, r)) = read.next() {
                    let Ok(b) = r else { return };
                    // (Marked before the send: the tier above may give it back at once.)
                    self.handed_up.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
                    if let Err(std::sync::mpsc::SendError((_, b, _))) = tx.send((key, Arc::new(b), rate)) {
                        let up = {
                            let mut up = self.handed_up.lock().unwrap_or_else(|p| p.into_inner());
                            up.remove(&key);
                            up.clone()
                        };
                        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                        if c.budget() == 0 {
                            return;
                        }
                        let rest = read.filter_map(|(k, rate, r)| r.ok().map(|b| (k, rate, Arc::new(b))));
                        for (k, rate, b) in std::iter::once((key, rate, b)).chain(rest) {
                            // (Skipping what the tier above loaded on its own meanwhile.)
                            if !c.contains(k) && !up.contains(&k) && c.insert_seeded(k, b, rate).is_ok() {
                                self.stats.prewarmed.fetch_add(1, Relaxed);
                            }
                        }
                        drop(c);
                        ram_keys.splice(0..0, ups[done + chunk.len()..].iter().copied());
                        break 'upper;
                    }
                    self.stats.prewarmed.fetch_add(1, Relaxed);
                }
                done += chunk.len();
            }
        }
        if self.ram_cache_budget() == 0 {
            return;
        }
        for chunk in ram_keys.chunks(batch) {
            if self.prewarm_stop.load(Relaxed) {
                return;
            }
            let mut todo: Vec<((u32, u32), f64)> = {
                let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let up = self.handed_up.lock().unwrap_or_else(|p| p.into_inner());
                chunk
                    .iter()
                    .copied()
                    .filter(|(k, _)| !c.contains(*k) && !p.contains_key(k) && !up.contains(k))
                    .collect()
            };
            if todo.is_empty() {
                continue;
            }
            todo.sort_unstable_by_key(|&(k, _)| k);
            let mut read: Vec<_> = self.pool.install(|| {
                todo.par_iter()
                    .map(|&((l, e), rate)| ((l, e), rate, self.read(self.mode, l as usize, e as usize)))
                    .collect()
            });
            // Read in file order, placed hottest first (so none displaces another of its batch).
            read.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut placed = 0;
            for (key, rate, r) in read {
                let Ok(b) = r else { return };
                if c.contains(key) {
                    continue;
                }
                // Scored at the expert's profiled rate: it only displaces entries that score
                // lower (cold ones, one-off misses), never what the run uses more.
                if c.insert_seeded(key, Arc::new(b), rate).is_ok() {
                    placed += 1;
                    self.stats.prewarmed.fetch_add(1, Relaxed);
                }
            }
            // Keys come hottest first: a batch that placed nothing means the tier is full of
            // experts at least as hot as the rest.
            if placed == 0 {
                return;
            }
        }
    }

    /// Starts reading experts `ids` of `layer` in the background (a guess of what the next
    /// `fetch` of that layer will ask for). Experts already cached or pending are skipped.
    pub fn prefetch(self: &Arc<Self>, layer: usize, ids: &[usize]) {
        let c = self.cache.lock().unwrap();
        let mut p = self.pending.lock().unwrap();
        for &e in ids {
            let key = (layer as u32, e as u32);
            if c.contains(key) || p.contains_key(&key) {
                continue;
            }
            let slot = Arc::new(Slot::default());
            p.insert(key, slot.clone());
            self.stats.prefetch_issued.fetch_add(1, Relaxed);
            let me = self.clone();
            self.pool.spawn(move || {
                let r = me.read(me.mode, layer, e).map(Arc::new).map_err(|err| err.to_string());
                *slot.value.lock().unwrap() = Some(r);
                slot.ready.notify_all();
            });
        }
    }

    pub fn snapshot(&self) -> IoSnapshot {
        let s = &self.stats;
        IoSnapshot {
            disk_bytes: s.disk_bytes.load(Relaxed),
            disk_reads: s.disk_reads.load(Relaxed),
            read_secs: s.read_nanos.load(Relaxed) as f64 * 1e-9,
            ram_hits: s.ram_hits.load(Relaxed),
            ram_misses: s.ram_misses.load(Relaxed),
            wait_secs: s.wait_nanos.load(Relaxed) as f64 * 1e-9,
            prefetch_issued: s.prefetch_issued.load(Relaxed),
            prefetch_used: s.prefetch_used.load(Relaxed),
            ram_taken: s.ram_taken.load(Relaxed),
            ram_admitted: s.ram_admitted.load(Relaxed),
            prewarmed: s.prewarmed.load(Relaxed),
        }
    }

    /// One expert's matrix bytes in `layer` (weights, scales, biases: not the padded stride on
    /// disk), from expert 0; None when it cannot be read.
    pub fn expert_matrix_bytes(&self, layer: usize) -> Option<usize> {
        let buf = self.fetch(layer, &[0]).ok()?.into_iter().next()?;
        self.expert_weights(layer, buf).ok().map(|w| w.bytes())
    }

    /// Matrix views over one fetched expert buffer: the layer's template applied to it, or (the
    /// template being made, or a range of it outside the buffer) the blob parsed, which gives
    /// the same views or the error naming the component.
    pub fn expert_weights(&self, layer: usize, buf: Arc<AlignedBuf>) -> Result<ExpertWeights> {
        let lf = &self.layers[layer];
        if let Some(t) = self.templates.get(layer)
            && let Some(w) = t.apply(&(buf.clone() as Arc<dyn crate::weights::store::ByteSource>))
        {
            return Ok(w);
        }
        let len = (lf.blob_bytes as usize).min(buf.len());
        let blob = Bytes::new(buf, 0, len);
        expert_from_blob(&lf.components, &blob, &lf.path, layer, self.hidden, self.intermediate)
    }
}

/// One expert's matrices from its blob (a read buffer, or an expert's range of a mapped expert
/// file), laid out as `components` say: float or affine safetensors dtypes, or one GGML block
/// type per projection. `file` and `layer` only name things in errors.
pub fn expert_from_blob(
    components: &[TensorEntry],
    blob: &Bytes,
    file: &Path,
    layer: usize,
    hidden: usize,
    intermediate: usize,
) -> Result<ExpertWeights> {
    // A component's bytes in the blob, checked to lie inside it.
    let component_bytes = |c: &TensorEntry| -> Result<Bytes> {
        if c.offset.checked_add(c.nbytes).is_none_or(|end| end > blob.len() as u64) {
            return Err(Error::file(file, format!("component `{}` lies outside the expert blob", c.name)));
        }
        Ok(blob.slice(c.offset as usize, c.nbytes as usize))
    };
    let tensor = |name: &str| -> Result<Option<RawTensor>> {
        let Some(c) = components.iter().find(|c| c.name == name) else {
            return Ok(None);
        };
        let dtype = parse_dtype(&c.dtype)
            .ok_or_else(|| Error::file(file, format!("component `{name}` has unsupported dtype `{}`", c.dtype)))?;
        Ok(Some(RawTensor {
            name: format!("layers.{layer}.experts.{name}"),
            dtype,
            shape: c.shape.clone(),
            bytes: component_bytes(c)?,
            file: file.to_path_buf(),
        }))
    };
    let proj = |p: &str, rows: usize, cols: usize| -> Result<Linear> {
        // A GGUF expert: one component in a GGML block type.
        let wname = format!("{p}.weight");
        if let Some(c) = components.iter().find(|c| c.name == wname)
            && parse_dtype(&c.dtype).is_none()
            && let Some(ty) = GgmlType::from_name(&c.dtype)
        {
            return Linear::ggml(ty, component_bytes(c)?, rows, cols, &format!("layers.{layer}.experts.{wname}"));
        }
        let w = tensor(&format!("{p}.weight"))?
            .ok_or_else(|| Error::file(file, format!("expert blob has no `{p}.weight`")))?;
        match (tensor(&format!("{p}.scales"))?, tensor(&format!("{p}.biases"))?) {
            (Some(s), Some(b)) => {
                let (wc, sc) = (*w.shape.last().unwrap_or(&0), *s.shape.last().unwrap_or(&0));
                if sc == 0 || !cols.is_multiple_of(sc) || !(wc * 32).is_multiple_of(cols) {
                    return Err(w.err(format!(
                        "cannot infer quantization for {cols} columns from shapes {:?} / {:?}",
                        w.shape, s.shape
                    )));
                }
                Linear::affine(&w, &s, &b, (wc * 32 / cols) as u32, cols / sc, rows, cols)
            }
            _ => Linear::float(&w, rows, cols),
        }
    };
    let (h, i) = (hidden, intermediate);
    Ok(ExpertWeights { gate: proj("gate_proj", i, h)?, up: proj("up_proj", i, h)?, down: proj("down_proj", h, i)? })
}

/// The experts of one layer of a packed model as views of its mapped expert file (no reads: the
/// page cache holds them), for a model whose experts do not stream.
pub fn mapped_experts(dir: &Path, ef: &ExpertFile, cfg: &ModelConfig) -> Result<Vec<ExpertWeights>> {
    let path = dir.join(&ef.file);
    let map = crate::packed::map_file(&path)?;
    if map.len() as u64 != ef.stride * ef.num_experts as u64 {
        return Err(Error::file(
            &path,
            format!(
                "has {} bytes, expected {} experts × {} (truncated or mismatched file)",
                map.len(),
                ef.num_experts,
                ef.stride
            ),
        ));
    }
    if ef.num_experts != cfg.num_experts {
        return Err(Error::file(
            &path,
            format!("holds {} experts but config.json says {}", ef.num_experts, cfg.num_experts),
        ));
    }
    let map: Arc<dyn ByteSource> = map;
    (0..ef.num_experts)
        .map(|x| {
            let blob = Bytes::new(map.clone(), x * ef.stride as usize, ef.blob_bytes as usize);
            expert_from_blob(&ef.components, &blob, &path, ef.layer, cfg.hidden_size, cfg.moe_intermediate)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn samples(page: &[f64], direct: &[f64]) -> IoSamples {
        IoSamples { page: page.to_vec(), direct: direct.to_vec() }
    }

    #[test]
    fn auto_io_takes_the_page_cache_when_the_experts_fit_in_ram_without_measuring() {
        let facts = AutoIoFacts { expert_bytes: 3 * GIB, ram_cache_bytes: GIB, available_ram: Some(20 * GIB) };
        let (mode, why) = choose_auto_io(&facts, || panic!("no measurement when the experts fit"));
        assert_eq!(mode, IoMode::Page);
        assert_eq!(
            why,
            "page (auto: the experts (3.0 GiB) fit in available RAM (19.0 GiB) beside the 1.0 GiB RAM tier, so the page cache keeps them after their first read)"
        );
    }

    #[test]
    fn auto_io_counts_the_ram_tier_against_available_ram() {
        // 10 GiB of experts, 12 GiB available, but our RAM tier takes 4 of them.
        let facts = AutoIoFacts { expert_bytes: 10 * GIB, ram_cache_bytes: 4 * GIB, available_ram: Some(12 * GIB) };
        let (mode, why) = choose_auto_io(&facts, || samples(&[1e9, 1e9, 1e9], &[3e9, 3e9, 3e9]));
        assert_eq!(mode, IoMode::Direct);
        assert!(why.starts_with("direct (auto: the experts (10.0 GiB) exceed available RAM (8.0 GiB);"), "{why}");
        assert!(why.contains("direct 3.00 GB/s, page 1.00 GB/s"), "{why}");
    }

    #[test]
    fn auto_io_needs_a_clear_median_win_for_o_direct() {
        let facts = AutoIoFacts { expert_bytes: 100 * GIB, ram_cache_bytes: 0, available_ram: Some(8 * GIB) };
        // One fast direct sample (a quiet moment on a loaded machine) does not decide.
        let (mode, why) = choose_auto_io(&facts, || samples(&[1.0e9, 1.1e9, 0.9e9], &[5e9, 1.0e9, 1.1e9]));
        assert_eq!(mode, IoMode::Page, "{why}");
        assert!(why.contains("direct 1.10 GB/s, page 1.00 GB/s, less than the 1.25× direct needs"), "{why}");
        // 20% faster is within the margin; 30% is not.
        assert_eq!(choose_auto_io(&facts, || samples(&[1e9; 3], &[1.2e9; 3])).0, IoMode::Page);
        assert_eq!(choose_auto_io(&facts, || samples(&[1e9; 3], &[1.3e9; 3])).0, IoMode::Direct);
    }

    #[test]
    fn auto_io_measures_when_available_ram_is_unknown() {
        let facts = AutoIoFacts { expert_bytes: GIB, ram_cache_bytes: 0, available_ram: None };
        let (mode, why) = choose_auto_io(&facts, || samples(&[1e9; 3], &[2e9; 3]));
        assert_eq!(mode, IoMode::Direct);
        assert!(why.contains("available RAM unknown"), "{why}");
    }

    #[test]
    fn available_ram_matches_proc_meminfo() {
        // /proc/meminfo, read here independently of the parser, in kB.
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let got = available_ram_bytes().unwrap();
        // The value moves between the two reads; within 256 MiB.
        assert!(got.abs_diff(kb * 1024) < 256 << 20, "{got} vs {} kB", kb);
    }
}
