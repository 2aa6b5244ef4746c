//! `flashmoe chat --model DIR`: a private `flashmoe serve` on 127.0.0.1 and a free port, run as
//! a child process in its own process group (so Ctrl-C in the chat does not stop it; its log
//! goes to a file, not the terminal), stopped when the chat ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::Client;

/// A running child server; killed on drop.
pub struct LocalServer {
    child: Child,
    url: String,
    log: PathBuf,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl LocalServer {
    /// Starts `EXE serve --model DIR --host 127.0.0.1 --port P EXTRA…` and waits (up to
    /// `timeout`) until `/health` answers. `log`: file for the server's output.
    pub fn start(exe: &Path, model_dir: &Path, extra: &[String], log: &Path, timeout: Duration) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        if let Some(d) = log.parent() {
            std::fs::create_dir_all(d)?;
        }
        let port = free_port()?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--model")
            .arg(model_dir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let mut s = Self { child, url: format!("http://127.0.0.1:{port}"), log: log.to_path_buf() };
        let client = Client::new(&s.url, None);
        let start = Instant::now();
        loop {
            if let Some(status) = s.child.try_wait()? {
                bail!("the model server exited ({status}) while starting:\n{}", s.log_tail());
            }
            if client.healthy() {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("the model server did not answer within {:?}:\n{}", timeout, s.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
