//! `flashmoe verify`: a packed model's sizes and checksums.

use crate::util::fmt_bytes;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct VerifyArgs {
    dir: PathBuf,
}

pub fn run(a: VerifyArgs) -> Result<()> {
    let rep = flashmoe::packed::verify::verify(&a.dir)?;
    println!("ok: {} tensors, {} experts, {} checked", rep.tensors, rep.experts, fmt_bytes(rep.bytes));
    Ok(())
}
