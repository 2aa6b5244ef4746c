//! The CUDA backend of a build without the `cuda` feature: the same name and constructor, and a
//! clear error from `open`. Nothing else in the engine asks which build it is (the one place the
//! feature is decided is the `mod cuda` line in backend/mod.rs).

use super::{Backend, BackendState};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::layers::{AttentionWeights, Convert, DeltaNetWeights, Host, MoeWeights, PassSpec};
use crate::weights::Linear;

/// False: `--device auto` stays on the CPU without a note.
pub const COMPILED: bool = false;

/// No value of this type exists: `open` always fails.
pub enum CudaBackend {}

/// The state type of a backend that never runs.
pub enum NoState {}

impl BackendState for NoState {
    fn duplicate(&self) -> Self {
        match *self {}
    }
    fn bytes(&self) -> usize {
        match *self {}
    }
}

/// No GPU without the `cuda` feature.
pub fn device_count() -> Result<usize> {
    CudaBackend::open(0, &Default::default(), 1, 1).map(|b| match b {})
}

impl CudaBackend {
    /// Never called: no value of this type exists.
    pub fn total_memory(&self) -> usize {
        match *self {}
    }

    pub fn open(_ordinal: usize, _opts: &super::DeviceOptions, _k: usize, _max_context: usize) -> Result<Self> {
        Err(Error::Device(
            "this flashmoe was built without CUDA support (cargo feature `cuda`); use --device cpu".into(),
        ))
    }
}

impl Backend for CudaBackend {
    type T = Host;
    type State = NoState;
    type Pass<'p> = NoState;

    fn describe(&self) -> String {
        match *self {}
    }
    fn upload(&self) -> impl Convert<Host, Host> + '_ {
        super::cpu::KeepOnHost
    }
    fn new_state(&self, _cfg: &ModelConfig) -> Result<NoState> {
        match *self {}
    }
    fn run(
        &self,
        _spec: &PassSpec<'_>,
        state: &mut NoState,
        _graph: &mut dyn for<'p> FnMut(&mut NoState) -> Result<()>,
        _out: &mut Vec<f32>,
    ) -> Result<()> {
        match *state {}
    }
    fn embed(&self, p: &mut NoState, _table: &Linear) -> Result<()> {
        match *p {}
    }
    fn rms_norm(&self, p: &mut NoState, _w: &Vec<f32>) -> Result<()> {
        match *p {}
    }
    fn attention(&self, p: &mut NoState, _l: usize, _w: &AttentionWeights<Host>, _f: &Vec<f32>) -> Result<()> {
        match *p {}
    }
    fn delta_net(&self, p: &mut NoState, _l: usize, _w: &DeltaNetWeights<Host>) -> Result<()> {
        match *p {}
    }
    fn add_rms_norm(&self, p: &mut NoState, _w: &Vec<f32>) -> Result<()> {
        match *p {}
    }
    fn moe(&self, p: &mut NoState, _l: usize, _w: &MoeWeights<Host>, _n: Option<&Vec<f32>>) -> Result<()> {
        match *p {}
    }
    fn logits(&self, p: &mut NoState, _lm_head: &Linear) -> Result<()> {
        match *p {}
    }
}
