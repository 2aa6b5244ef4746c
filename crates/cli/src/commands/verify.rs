//! `flashmoe verify`: a packed model's sizes and checksums.

use crate::util::fmt_bytes;
use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// Packed model: a folder, or `builtin`.
    dir: String,
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let rep = flashmoe::packed::verify::verify(&crate::args::model::resolve(&a.dir)?.path)?;
    println!("ok: {} tensors, {} experts, {} checked", rep.tensors, rep.experts, fmt_bytes(rep.bytes));
    Ok(())
}
