//! A backend that lives outside the engine, as a third backend would: it implements
//! `flashmoe::backend::Backend` by running the CPU backend's ops and checking each op's result
//! independently (every activation finite; every norm's output recomputed here in f64 from its
//! input and weights). The reference tests run their whole body on it.

use flashmoe::backend::cpu::{CpuBackend, CpuPass, CpuState};
use flashmoe::backend::{Backend, Phase};
use flashmoe::layers::{AttentionWeights, Convert, DeltaNetWeights, Host, MoeWeights, PassSpec};
use flashmoe::weights::Linear;
use flashmoe::{ModelConfig, Result};

#[derive(Default)]
pub struct CheckingBackend {
    cpu: CpuBackend,
}

fn finite(what: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(flashmoe::Error::input(format!("checking backend: {what}[{i}] = {}", v[i]))),
        None => Ok(()),
    }
}

impl CheckingBackend {
    /// normed must be RMSNorm(x)·w row by row (f64 reference, relative 1e-5).
    fn check_norm(&self, p: &CpuPass<'_>, w: &[f32]) -> Result<()> {
        let eps = p.spec().cfg.rms_norm_eps as f64;
        let h = w.len();
        for (xr, nr) in p.x().chunks_exact(h).zip(p.normed().chunks_exact(h)) {
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((&xv, &nv), &wv) in xr.iter().zip(nr).zip(w) {
                let want = xv as f64 * inv * wv as f64;
                if (nv as f64 - want).abs() > 1e-5 * want.abs().max(1.0) {
                    return Err(flashmoe::Error::input(format!("checking backend: norm gives {nv}, f64 gives {want}")));
                }
            }
        }
        Ok(())
    }
}

impl Backend for CheckingBackend {
    type T = Host;
    type State = CpuState;
    type Pass<'p> = CpuPass<'p>;

    fn describe(&self) -> String {
        "checking (cpu ops, each result checked)".into()
    }

    fn upload(&self) -> impl Convert<Host, Host> + '_ {
        self.cpu.upload()
    }

    fn new_state(&self, cfg: &ModelConfig) -> Result<CpuState> {
        self.cpu.new_state(cfg)
    }

    fn run(
        &self,
        spec: &PassSpec<'_>,
        state: &mut CpuState,
        graph: &mut dyn for<'p> FnMut(&mut CpuPass<'p>) -> Result<()>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        self.cpu.run(spec, state, graph, out)?;
        finite("logits", out)
    }

    fn embed(&self, p: &mut CpuPass<'_>, table: &Linear) -> Result<()> {
        self.cpu.embed(p, table)?;
        finite("embedding", p.x())
    }

    fn rms_norm(&self, p: &mut CpuPass<'_>, w: &Vec<f32>) -> Result<()> {
        self.cpu.rms_norm(p, w)?;
        self.check_norm(p, w)
    }

    fn attention(&self, p: &mut CpuPass<'_>, layer: usize, w: &AttentionWeights<Host>, f: &Vec<f32>) -> Result<()> {
        self.cpu.attention(p, layer, w, f)?;
        finite("attention output", p.mixed())
    }

    fn delta_net(&self, p: &mut CpuPass<'_>, layer: usize, w: &DeltaNetWeights<Host>) -> Result<()> {
        self.cpu.delta_net(p, layer, w)?;
        finite("GatedDeltaNet output", p.mixed())
    }

    fn add_rms_norm(&self, p: &mut CpuPass<'_>, w: &Vec<f32>) -> Result<()> {
        self.cpu.add_rms_norm(p, w)?;
        self.check_norm(p, w)
    }

    fn prefetch(&self, p: &mut CpuPass<'_>, layer: usize, w: &MoeWeights<Host>) -> Result<()> {
        self.cpu.prefetch(p, layer, w)
    }

    fn moe(&self, p: &mut CpuPass<'_>, layer: usize, w: &MoeWeights<Host>, next: Option<&Vec<f32>>) -> Result<()> {
        self.cpu.moe(p, layer, w, next)?;
        finite("residual stream after the MoE", p.x())?;
        match next {
            Some(n) => self.check_norm(p, n),
            None => Ok(()),
        }
    }

    fn logits(&self, p: &mut CpuPass<'_>, lm_head: &Linear) -> Result<()> {
        self.cpu.logits(p, lm_head)
    }

    fn mark(&self, p: &mut CpuPass<'_>, layer: usize, phase: Phase) {
        self.cpu.mark(p, layer, phase)
    }
}
