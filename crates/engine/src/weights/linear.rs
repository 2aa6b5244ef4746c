//! `Linear`: a weight matrix y = W·x that lives in the mapped checkpoint (f32/bf16/f16 or MLX
//! affine-quantized), possibly assembled from row ranges of one or more tensors. Row ranges are how
//! we take one expert out of a stacked [E, out, in] tensor and how Qwen3-Next's key-head-grouped
//! `in_proj_qkvz` is regrouped without copying it. GGUF tensors in a GGML block-quant type are
//! the third kind of source.

use super::store::{Bytes, RawTensor};
use crate::error::Result;
use flashmoe_kernels::ggml::GgmlType;
use flashmoe_kernels::{FloatType, MatRef};
use safetensors::Dtype;

#[derive(Clone, Debug)]
enum Source {
    Float {
        dtype: FloatType,
        data: Bytes,
    },
    Affine {
        bits: u32,
        group_size: usize,
        weight: Bytes,
        scales: Bytes,
        biases: Bytes,
        sb_dtype: FloatType,
    },
    /// GGML block-quantized rows (a GGUF tensor), `ty.row_bytes(cols)` bytes per row.
    Ggml {
        ty: GgmlType,
        data: Bytes,
    },
}

/// A contiguous row range of one stored matrix.
#[derive(Clone, Debug)]
struct Part {
    source: Source,
    /// Rows of the whole stored matrix (all experts for a stacked tensor).
    total_rows: usize,
    row_start: usize,
    rows: usize,
}

impl Part {
    /// The whole stored matrix this part is a row range of.
    fn full(&self, cols: usize) -> std::result::Result<MatRef<'_>, flashmoe_kernels::KernelError> {
        match &self.source {
            Source::Float { dtype, data } => MatRef::float(*dtype, data.as_slice(), self.total_rows, cols),
            Source::Affine { bits, group_size, weight, scales, biases, sb_dtype } => MatRef::affine(
                *bits,
                *group_size,
                weight.as_slice(),
                scales.as_slice(),
                biases.as_slice(),
                *sb_dtype,
                self.total_rows,
                cols,
            ),
            Source::Ggml { ty, data } => MatRef::ggml(*ty, data.as_slice(), self.total_rows, cols),
        }
    }

    fn mat(&self, cols: usize) -> MatRef<'_> {
        let full = self.full(cols).expect("matrix sizes were validated when the Linear was built");
        full.rows_slice(self.row_start, self.rows)
    }

    /// Checks the stored bytes against the shape, so that `mat()` cannot fail later.
    fn validate(&self, cols: usize) -> std::result::Result<(), flashmoe_kernels::KernelError> {
        self.full(cols).map(|_| ())
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    parts: Vec<Part>,
    rows: usize,
    cols: usize,
}

fn float_name(t: FloatType) -> &'static str {
    match t {
        FloatType::F32 => "f32",
        FloatType::BF16 => "bf16",
        FloatType::F16 => "f16",
    }
}

pub fn float_type(t: &RawTensor) -> Result<FloatType> {
    match t.dtype {
        Dtype::F32 => Ok(FloatType::F32),
        Dtype::BF16 => Ok(FloatType::BF16),
        Dtype::F16 => Ok(FloatType::F16),
        other => {
            Err(t.err(format!("unsupported dtype {other:?} (expected F32, BF16, F16, or U32 with scales/biases)")))
        }
    }
}

impl Linear {
    /// A float matrix whose logical shape is [rows, cols]; `t` may have any shape with that many
    /// elements (e.g. [E, out, in] seen as [E·out, in]).
    pub fn float(t: &RawTensor, rows: usize, cols: usize) -> Result<Self> {
        let dtype = float_type(t)?;
        if t.numel() != rows * cols {
            return Err(t.err(format!("shape {:?} does not hold a [{rows}, {cols}] matrix", t.shape)));
        }
        let source = Source::Float { dtype, data: t.bytes.clone() };
        // Validate now so that later `mat()` calls cannot fail.
        let l = Self::single(source, rows, cols);
        l.check(t)?;
        Ok(l)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn affine(
        w: &RawTensor,
        s: &RawTensor,
        b: &RawTensor,
        bits: u32,
        group_size: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        if w.dtype != Dtype::U32 {
            return Err(w.err(format!("quantized weight must be U32, found {:?}", w.dtype)));
        }
        let sb_dtype = float_type(s)?;
        if float_type(b)? != sb_dtype {
            return Err(b.err("biases and scales have different dtypes"));
        }
        let source = Source::Affine {
            bits,
            group_size,
            weight: w.bytes.clone(),
            scales: s.bytes.clone(),
            biases: b.bytes.clone(),
            sb_dtype,
        };
        let l = Self::single(source, rows, cols);
        l.check(w)?;
        Ok(l)
    }

    /// A GGUF tensor of `ty` holding a [rows, cols] matrix (GGUF dims [cols, rows, ...], leading
    /// dims folded into rows). The plain float types become float matrices; block-quantized
    /// types need kernels for `ty` (an error names the type otherwise).
    pub fn ggml(ty: GgmlType, data: Bytes, rows: usize, cols: usize, name: &str) -> Result<Self> {
        let source = match ty {
            GgmlType::F32 => Source::Float { dtype: FloatType::F32, data },
            GgmlType::F16 => Source::Float { dtype: FloatType::F16, data },
            GgmlType::BF16 => Source::Float { dtype: FloatType::BF16, data },
            _ => Source::Ggml { ty, data },
        };
        let l = Self::single(source, rows, cols);
        for p in &l.parts {
            p.validate(cols).map_err(|e| crate::error::Error::input(format!("GGUF tensor `{name}`: {e}")))?;
        }
        Ok(l)
    }

    /// The same matrix with every byte range replaced by `f` of it (None if `f` refuses one):
    /// how an expert layout made once per layer is applied to each fetched expert buffer.
    pub(crate) fn map_bytes(&self, f: &mut impl FnMut(&Bytes) -> Option<Bytes>) -> Option<Linear> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            let source = match &p.source {
                Source::Float { dtype, data } => Source::Float { dtype: *dtype, data: f(data)? },
                Source::Affine { bits, group_size, weight, scales, biases, sb_dtype } => Source::Affine {
                    bits: *bits,
                    group_size: *group_size,
                    weight: f(weight)?,
                    scales: f(scales)?,
                    biases: f(biases)?,
                    sb_dtype: *sb_dtype,
                },
                Source::Ggml { ty, data } => Source::Ggml { ty: *ty, data: f(data)? },
            };
            parts.push(Part { source, ..*p });
        }
        Some(Linear { parts, rows: self.rows, cols: self.cols })
    }

    fn single(source: Source, rows: usize, cols: usize) -> Self {
        Linear { parts: vec![Part { source, total_rows: rows, row_start: 0, rows }], rows, cols }
    }

    fn check(&self, t: &RawTensor) -> Result<()> {
        for p in &self.parts {
            p.validate(self.cols).map_err(|e| t.err(e.to_string()))?;
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `start..start+len` of this matrix, as a new view.
    pub fn select_rows(&self, start: usize, len: usize) -> Linear {
        assert!(start + len <= self.rows, "row range out of bounds");
        let mut parts = Vec::new();
        let mut offset = 0;
        for p in &self.parts {
            let (a, b) = (offset, offset + p.rows);
            let (lo, hi) = (start.max(a), (start + len).min(b));
            if lo < hi {
                parts.push(Part {
                    source: p.source.clone(),
                    total_rows: p.total_rows,
                    row_start: p.row_start + (lo - a),
                    rows: hi - lo,
                });
            }
            offset = b;
        }
        Linear { parts, rows: len, cols: self.cols }
    }

    /// Stacks matrices with the same number of columns (output rows concatenated in order).
    pub fn concat_rows(items: &[Linear]) -> Linear {
        let cols = items[0].cols;
        assert!(items.iter().all(|l| l.cols == cols));
        Linear {
            parts: items.iter().flat_map(|l| l.parts.iter().cloned()).collect(),
            rows: items.iter().map(|l| l.rows).sum(),
            cols,
        }
    }

    /// Bytes a full pass over this matrix reads (weights + scales + biases).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.mat(self.cols).bytes()).sum()
    }

    /// How the matrix is stored: `bf16`, `f32`, `f16`, or e.g. `4-bit affine (group 64, bf16
    /// scales)`; the formats of the parts joined with `+` when they differ.
    pub fn format_name(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        for p in &self.parts {
            let name = match &p.source {
                Source::Float { dtype, .. } => float_name(*dtype).to_string(),
                Source::Affine { bits, group_size, sb_dtype, .. } => {
                    format!("{bits}-bit affine (group {group_size}, {} scales)", float_name(*sb_dtype))
                }
                Source::Ggml { ty, .. } => ty.name().to_string(),
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.join(" + ")
    }

    pub fn is_quantized(&self) -> bool {
        self.parts.iter().any(|p| matches!(p.source, Source::Affine { .. } | Source::Ggml { .. }))
    }

    /// y = W·x for `n` inputs: x is [n, cols], y is [n, rows]. Each weight row is read once per call.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols);
        assert_eq!(y.len(), n * self.rows);
        if self.parts.len() == 1 {
            let m = self.parts[0].mat(self.cols);
            if n == 1 {
                flashmoe_kernels::matvec(&m, x, y);
            } else {
                flashmoe_kernels::matmul(&m, x, n, y);
            }
            return;
        }
        if n == 1 {
            let mut off = 0;
            for p in &self.parts {
                flashmoe_kernels::matvec(&p.mat(self.cols), x, &mut y[off..off + p.rows]);
                off += p.rows;
            }
            return;
        }
        let mut off = 0;
        let mut tmp = Vec::new();
        for p in &self.parts {
            tmp.resize(n * p.rows, 0.0);
            flashmoe_kernels::matmul(&p.mat(self.cols), x, n, &mut tmp);
            for t in 0..n {
                y[t * self.rows + off..t * self.rows + off + p.rows]
                    .copy_from_slice(&tmp[t * p.rows..(t + 1) * p.rows]);
            }
            off += p.rows;
        }
    }

    /// Where this matrix's bytes live, as (component, dtype, stored shape, bytes) — `weight`, plus
    /// `scales` and `biases` when quantized. Only for a matrix that is one row range of one
    /// stored tensor (every expert is); None otherwise.
    #[allow(clippy::type_complexity)]
    pub fn stored_pieces(&self) -> Option<Vec<(&'static str, &'static str, Vec<usize>, Bytes)>> {
        let [p] = self.parts.as_slice() else { return None };
        let (r0, n, cols) = (p.row_start, p.rows, self.cols);
        let name = |t: FloatType| match t {
            FloatType::F32 => "F32",
            FloatType::BF16 => "BF16",
            FloatType::F16 => "F16",
        };
        Some(match &p.source {
            Source::Float { dtype, data } => {
                let rb = cols * dtype.size();
                vec![("weight", name(*dtype), vec![n, cols], data.slice(r0 * rb, n * rb))]
            }
            Source::Affine { bits, group_size, weight, scales, biases, sb_dtype } => {
                let wb = cols * *bits as usize / 8;
                let groups = cols / group_size;
                let sb = groups * sb_dtype.size();
                vec![
                    ("weight", "U32", vec![n, wb / 4], weight.slice(r0 * wb, n * wb)),
                    ("scales", name(*sb_dtype), vec![n, groups], scales.slice(r0 * sb, n * sb)),
                    ("biases", name(*sb_dtype), vec![n, groups], biases.slice(r0 * sb, n * sb)),
                ]
            }
            Source::Ggml { ty, data } => {
                let rb = ty.row_bytes(cols).expect("validated at construction");
                vec![("weight", ty.name(), vec![n, cols], data.slice(r0 * rb, n * rb))]
            }
        })
    }

    /// The stored row ranges this matrix is made of, in output-row order (for conversion).
    pub fn mats(&self) -> Vec<MatRef<'_>> {
        self.parts.iter().map(|p| p.mat(self.cols)).collect()
    }

    /// Adds `y = W·x` for `n` inputs to a kernel batch (`flashmoe_kernels::matmul_batch`), one
    /// job per stored row range. A matrix of several row ranges and several inputs (its output
    /// rows interleave in `y`) is computed here instead, at once.
    pub fn push_jobs<'a>(
        &'a self,
        x: &'a [f32],
        n: usize,
        y: &'a mut [f32],
        jobs: &mut Vec<flashmoe_kernels::MatJob<'a>>,
    ) {
        assert_eq!(x.len(), n * self.cols);
        assert_eq!(y.len(), n * self.rows);
        if self.parts.len() > 1 && n > 1 {
            self.forward(x, n, y);
            return;
        }
        let mut rest = y;
        for p in &self.parts {
            let (yp, tail) = rest.split_at_mut(n * p.rows);
            jobs.push(flashmoe_kernels::MatJob { m: p.mat(self.cols), x, n, y: yp });
            rest = tail;
        }
    }

    /// Several projections of the same input (a layer's q/k/v, or a GatedDeltaNet's qkv/z/b/a)
    /// as one kernel batch: one parallel region for all of them, rather than one per matrix
    /// (each region costs a fork-join, which on many cores is a sizeable part of a decode
    /// matvec). Each output is what [`Linear::apply`] would give.
    pub fn apply_many<const N: usize>(mats: [&Linear; N], x: &[f32], n: usize) -> [Vec<f32>; N] {
        let mut outs: [Vec<f32>; N] = std::array::from_fn(|i| vec![0.0; n * mats[i].rows]);
        let mut jobs = Vec::with_capacity(N);
        for (m, y) in mats.iter().zip(outs.iter_mut()) {
            m.push_jobs(x, n, y, &mut jobs);
        }
        flashmoe_kernels::matmul_batch(&mut jobs);
        drop(jobs);
        outs
    }

    /// Convenience: allocates the output.
    pub fn apply(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * self.rows];
        self.forward(x, n, &mut y);
        y
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let mut off = 0;
        for p in &self.parts {
            if r < off + p.rows {
                flashmoe_kernels::dequant_row(&p.mat(self.cols), r - off, out);
                return;
            }
            off += p.rows;
        }
        panic!("row {r} out of range {}", self.rows);
    }
}
