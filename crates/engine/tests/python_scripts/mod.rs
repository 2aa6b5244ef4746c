//! The repository's Python fixture and bench scripts (gguf-py and numpy, pinned by
//! scripts/ci_python_deps.sh), run by the GGUF tests.

use std::ffi::OsStr;
use std::path::Path;

/// Runs `python3 script args…`. A failure names the command, what it needs and its stderr.
pub fn run_python<I, S>(script: &Path, args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let run = std::process::Command::new("python3").arg(script).args(&args).output();
    let ok = run.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} {} failed (needs Python with numpy and the pinned `gguf` package: bash scripts/ci_python_deps.sh): {}",
        script.display(),
        args.iter().map(|a| a.as_ref().to_string_lossy()).collect::<Vec<_>>().join(" "),
        run.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_else(|e| e.to_string())
    );
}
