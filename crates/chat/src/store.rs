//! Conversations on disk: `DATA/conversations/ID.jsonl`, one OpenAI-style message per line
//! (`role`, `content`, and `reasoning_content` / `tool_calls` / `tool_call_id` where present),
//! appended as the conversation goes. DATA is `$FLASHMOE_DATA` if set, else `$FLASHMOE_HOME` (the
//! folder the engine caches in), else `dirs::data_dir()/flashmoe`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

/// The data directory of flashmoe (`$FLASHMOE_DATA`, else `$FLASHMOE_HOME`, else the platform's
/// data dir + `flashmoe`): one variable moves everything flashmoe writes.
pub fn data_dir() -> PathBuf {
    for var in ["FLASHMOE_DATA", "FLASHMOE_HOME"] {
        if let Some(d) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
    }
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("flashmoe")
}

/// A saved conversation.
#[derive(Debug)]
pub struct Conversation {
    pub id: String,
    pub path: PathBuf,
    pub messages: Vec<Json>,
}

/// A fresh conversation id: UTC date and time plus 4 random hex digits (`20250101-120000-ab12`).
pub fn new_id() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let t = secs % 86400;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{:04x}", t / 3600, t / 60 % 60, t % 60, rand::random::<u16>())
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("bad conversation id `{id}` (letters, digits, - and _ only)");
    }
    Ok(())
}

/// The conversations folder of a data directory.
pub fn conversations_dir(data: &Path) -> PathBuf {
    data.join("conversations")
}

impl Conversation {
    /// A new, empty conversation (the file is created at the first message).
    pub fn new(data: &Path) -> Self {
        let id = new_id();
        Self { path: conversations_dir(data).join(format!("{id}.jsonl")), id, messages: Vec::new() }
    }

    /// Loads a saved conversation. A torn last line (crash mid-write) is skipped.
    pub fn load(data: &Path, id: &str) -> Result<Self> {
        check_id(id)?;
        let path = conversations_dir(data).join(format!("{id}.jsonl"));
        let file = File::open(&path).with_context(|| format!("no conversation `{id}` ({})", path.display()))?;
        let mut messages = Vec::new();
        let lines: Vec<String> = BufReader::new(file).lines().collect::<std::io::Result<_>>()?;
        let n = lines.len();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Json>(line) {
                Ok(v) if v.get("role").and_then(Json::as_str).is_some() => messages.push(v),
                _ if i + 1 == n => {}
                _ => bail!("{}: line {} is not a message", path.display(), i + 1),
            }
        }
        Ok(Self { id: id.to_string(), path, messages })
    }

    /// Appends a message, in memory and on disk.
    pub fn push(&mut self, message: Json) -> Result<()> {
        let line = serde_json::to_string(&message)?;
        self.messages.push(message);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Owner-only (0600), like the rewrite: transcripts hold what the user typed and tools read.
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    /// Sets (or with `None` removes) the system message, rewriting the file.
    pub fn set_system(&mut self, system: Option<&str>) -> Result<()> {
        if self.messages.first().is_some_and(|m| m["role"] == "system") {
            self.messages.remove(0);
        }
        if let Some(s) = system {
            self.messages.insert(0, serde_json::json!({"role": "system", "content": s}));
        }
        self.rewrite()
    }

    /// The system message, if any.
    pub fn system(&self) -> Option<&str> {
        self.messages.first().filter(|m| m["role"] == "system").and_then(|m| m["content"].as_str())
    }

    fn rewrite(&self) -> Result<()> {
        if self.messages.is_empty() && !self.path.exists() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for m in &self.messages {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        // Owner-only (0600): transcripts hold what the user typed and what tools read.
        let write = || -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())
        };
        write().with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

/// Saved conversations, newest first: (id, number of messages, first user message).
pub fn list(data: &Path) -> Vec<(String, usize, String)> {
    let Ok(rd) = std::fs::read_dir(conversations_dir(data)) else { return Vec::new() };
    let mut items: Vec<(std::time::SystemTime, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".jsonl")?.to_string();
            Some((e.metadata().and_then(|m| m.modified()).ok()?, id))
        })
        .collect();
    items.sort_by(|a, b| b.cmp(a));
    items
        .into_iter()
        .filter_map(|(_, id)| {
            let c = Conversation::load(data, &id).ok()?;
            let first = c
                .messages
                .iter()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect();
            Some((id, c.messages.len(), first))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let id = new_id();
        assert_eq!(id.len(), 20, "{id}");
        assert!(check_id(&id).is_ok());
        assert!(check_id("../x").is_err());
    }

    #[test]
    fn save_load_resume() {
        let data = std::env::temp_dir().join(format!("flashmoe-chat-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        let mut c = Conversation::new(&data);
        c.push(json!({"role": "user", "content": "hi\nthere"})).unwrap();
        c.push(json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "bash", "arguments": "{\"command\":\"ls\"}"}}]}))
            .unwrap();
        c.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "a\nb"})).unwrap();
        c.set_system(Some("be brief")).unwrap();
        let back = Conversation::load(&data, &c.id).unwrap();
        assert_eq!(back.messages, c.messages);
        assert_eq!(back.system(), Some("be brief"));
        assert_eq!(back.messages.len(), 4);
        // Owner-only, after appends and after a rewrite.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&c.path).unwrap().permissions().mode() & 0o777, 0o600);
        // A torn last line is ignored.
        std::fs::OpenOptions::new().append(true).open(&c.path).unwrap().write_all(b"{\"role\": \"us").unwrap();
        assert_eq!(Conversation::load(&data, &c.id).unwrap().messages.len(), 4);
        let l = list(&data);
        assert_eq!(l, vec![(c.id.clone(), 4, "hi".to_string())]);
        assert!(Conversation::load(&data, "nope").is_err());
        std::fs::remove_dir_all(&data).unwrap();
    }
}
