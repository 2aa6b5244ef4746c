//! Routing traces: the file format the runtime writes (`--trace-routing FILE`) and reads.
//!
//! A trace is JSON Lines: a header
//! `{"flashmoe_routing_trace": 1, "num_layers": L, "num_experts": E, "top_k": K}`, then one line
//! per token `{"pos": P, "experts": [[e, …] per layer]}`.
//!
//! Statistics and cache-policy simulation over traces live in the `flashmoe-tools` crate.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

pub const TRACE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceHeader {
    pub flashmoe_routing_trace: u32,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
}

impl TraceHeader {
    pub fn new(num_layers: usize, num_experts: usize, top_k: usize) -> Self {
        TraceHeader { flashmoe_routing_trace: TRACE_VERSION, num_layers, num_experts, top_k }
    }
}

/// The experts one token chose in every layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceToken {
    pub pos: usize,
    pub experts: Vec<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub header: TraceHeader,
    pub tokens: Vec<TraceToken>,
}

/// Appends tokens to a trace file (buffered; call [`TraceWriter::flush`] at the end).
pub struct TraceWriter {
    out: BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    header: TraceHeader,
}

impl TraceWriter {
    pub fn new(path: &Path, header: TraceHeader) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
        let mut w = TraceWriter { out: BufWriter::with_capacity(1 << 16, f), path: path.to_path_buf(), header };
        let line = serde_json::to_string(&w.header).expect("header serializes");
        w.line(&line)?;
        Ok(w)
    }

    fn line(&mut self, s: &str) -> Result<()> {
        self.out
            .write_all(s.as_bytes())
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|e| Error::file(&self.path, format!("write failed: {e}")))
    }

    /// One token: `experts[l]` are the experts chosen in layer l.
    pub fn write_token(&mut self, pos: usize, experts: &[Vec<u32>]) -> Result<()> {
        if experts.len() != self.header.num_layers {
            return Err(Error::input(format!(
                "routing trace: token {pos} has {} layers, the header says {}",
                experts.len(),
                self.header.num_layers
            )));
        }
        let mut s = String::with_capacity(16 + experts.len() * (self.header.top_k * 4 + 3));
        s.push_str("{\"pos\":");
        s.push_str(&pos.to_string());
        s.push_str(",\"experts\":[");
        for (l, layer) in experts.iter().enumerate() {
            if l > 0 {
                s.push(',');
            }
            s.push('[');
            for (i, e) in layer.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&e.to_string());
            }
            s.push(']');
        }
        s.push_str("]}");
        self.line(&s)
    }

    /// Routing decisions as the engine records them, `(layer, pos, experts)` in any order (prefill
    /// is layer-major, decode token-major), for positions of one sequence: written as one line per
    /// position, in position order. Every position must have every layer.
    pub fn write_decisions(&mut self, decisions: &[(usize, usize, Vec<u32>)]) -> Result<()> {
        let nl = self.header.num_layers;
        let mut by_pos: BTreeMap<usize, Vec<Option<Vec<u32>>>> = BTreeMap::new();
        for (layer, pos, experts) in decisions {
            if *layer >= nl {
                return Err(Error::input(format!(
                    "routing trace: layer {layer} at position {pos}, the header says {nl} layers"
                )));
            }
            by_pos.entry(*pos).or_insert_with(|| vec![None; nl])[*layer] = Some(experts.clone());
        }
        for (pos, layers) in by_pos {
            let layers: Option<Vec<Vec<u32>>> = layers.into_iter().collect();
            let layers =
                layers.ok_or_else(|| Error::input(format!("routing trace: position {pos} is missing some layers")))?;
            self.write_token(pos, &layers)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::file(&self.path, format!("write failed: {e}")))
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// Reads a trace written by [`TraceWriter`], checking every line against the header.
pub fn read_trace(path: &Path) -> Result<Trace> {
    let f = flashmoe_text::file::open_regular(path).map_err(|e| Error::io(path, e))?;
    let mut lines = BufReader::new(f).lines();
    let bad = |n: usize, msg: String| Error::file(path, format!("line {n}: {msg}"));
    let first = match lines.next() {
        Some(l) => l.map_err(|e| Error::io(path, e))?,
        None => return Err(Error::file(path, "empty file: not a routing trace")),
    };
    let header: TraceHeader = serde_json::from_str(&first).map_err(|e| {
        bad(
            1,
            format!("not a flashmoe routing trace header ({e}); expected {{\"flashmoe_routing_trace\": 1, \"num_layers\": …, \"num_experts\": …, \"top_k\": …}}"),
        )
    })?;
    if header.flashmoe_routing_trace != TRACE_VERSION {
        return Err(bad(
            1,
            format!(
                "trace format version {} is not supported (this build reads {TRACE_VERSION})",
                header.flashmoe_routing_trace
            ),
        ));
    }
    let mut tokens = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let t: TraceToken = serde_json::from_str(&line).map_err(|e| bad(n, format!("malformed token line: {e}")))?;
        if t.experts.len() != header.num_layers {
            return Err(bad(n, format!("{} layers, the header says {}", t.experts.len(), header.num_layers)));
        }
        if let Some(e) = t.experts.iter().flatten().find(|&&e| e as usize >= header.num_experts) {
            return Err(bad(n, format!("expert {e} out of range (num_experts {})", header.num_experts)));
        }
        tokens.push(t);
    }
    Ok(Trace { header, tokens })
}
