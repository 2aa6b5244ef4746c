//! The chat client's tools: `bash` (runs `bash -c`, with a timeout) and `read_file`. Their
//! output is capped so one call cannot flood the model's context.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

/// Limits of tool execution.
#[derive(Debug, Clone, Copy)]
pub struct ToolLimits {
    /// Most bytes of output returned to the model.
    pub max_output: usize,
    /// Wall-clock limit of a `bash` call.
    pub timeout: Duration,
}

/// Bytes of tool output that fit half of a `context`-token window: at most ~3 bytes per token
/// of ordinary text in the Qwen and built-in tokenizers (the built-in one averages 3.4 on its
/// corpus), so the other half stays for the conversation and the reply.
pub fn output_cap_for_context(context: usize) -> usize {
    (context / 2).saturating_mul(3).max(256)
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self { max_output: 16 * 1024, timeout: Duration::from_secs(60) }
    }
}

/// The tool result sent back when the user says no.
pub const REFUSED: &str = "the user refused this call";

/// OpenAI `tools` schemas of the built-in tools. The built-in model was fine-tuned with exactly
/// these (testdata/chat/tools.json; a test checks they stay equal).
pub fn tool_schemas() -> Json {
    json!([
        {"type": "function", "function": {
            "name": "bash",
            "description": "Run a shell command with `bash -c` in the user's current directory and return its \
                            combined stdout and stderr (capped) and exit status.",
            "parameters": {"type": "object", "properties": {
                "command": {"type": "string", "description": "The command line to run."}
            }, "required": ["command"]}}},
        {"type": "function", "function": {
            "name": "read_file",
            "description": "Read a text file and return its contents (capped).",
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string", "description": "Path of the file, absolute or relative to the current directory."}
            }, "required": ["path"]}}}
    ])
}

/// A short one-line description of a call for the approval prompt.
pub fn describe(name: &str, args: &Json) -> String {
    match (name, args.get("command").and_then(Json::as_str), args.get("path").and_then(Json::as_str)) {
        ("bash", Some(cmd), _) => format!("bash: {cmd}"),
        ("read_file", _, Some(path)) => format!("read_file: {path}"),
        _ => format!("{name} {args}"),
    }
}

/// Runs a tool call; the returned text is the tool result given to the model.
pub fn execute(name: &str, arguments: &str, limits: &ToolLimits) -> String {
    let args: Json = match serde_json::from_str(arguments) {
        Ok(v @ Json::Object(_)) => v,
        _ => return format!("error: the arguments are not a JSON object: {arguments}"),
    };
    let str_arg = |k: &str| args.get(k).and_then(Json::as_str);
    match name {
        "bash" => match str_arg("command") {
            Some(cmd) => run_bash(cmd, limits),
            None => "error: `command` (string) is required".into(),
        },
        "read_file" => match str_arg("path") {
            Some(path) => read_file(path, limits),
            None => "error: `path` (string) is required".into(),
        },
        _ => format!("error: unknown tool `{name}` (available: bash, read_file)"),
    }
}

/// First `max` bytes of `bytes` (cut at a UTF-8 boundary), with a note of what was left out.
pub fn cap_output(bytes: &[u8], total: usize, max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    let mut text = if bytes.len() > max {
        // A lossy cut may end in a replacement char; trim to the last full char.
        text.trim_end_matches('\u{FFFD}').to_string()
    } else {
        text
    };
    if total > max {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("[output truncated: {total} bytes, first {max} shown]"));
    }
    text
}

/// Runs `bash -c COMMAND` (stderr merged into stdout, stdin closed) in its own process group,
/// killed at the timeout.
pub fn run_bash(command: &str, limits: &ToolLimits) -> String {
    use std::os::unix::process::CommandExt;
    let mut child = match Command::new("bash")
        .arg("-c")
        .arg(format!("exec 2>&1\n{command}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return format!("error: cannot run bash: {e}"),
    };
    let mut stdout = child.stdout.take().expect("piped stdout");
    let max = limits.max_output;
    // Reads everything (so the command never blocks on a full pipe), keeps the first `max` bytes.
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut total = 0usize;
        let mut chunk = [0u8; 8192];
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    let room = (max + 4).saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        (kept, total)
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= limits.timeout => {
                timed_out = true;
                kill_group(child.id());
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    // Background processes of the command may keep the pipe open: stop waiting for them soon.
    let deadline = Instant::now() + Duration::from_millis(500);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !reader.is_finished() {
        kill_group(child.id());
    }
    let (kept, total) = reader.join().unwrap_or_default();
    let mut out = cap_output(&kept, total, max);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if timed_out {
        out.push_str(&format!("[timed out after {} s; killed]", limits.timeout.as_secs_f64()));
    } else {
        match status.and_then(|s| s.code()) {
            Some(code) => out.push_str(&format!("[exit code {code}]")),
            None => out.push_str("[killed by a signal]"),
        }
    }
    out
}

fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reads a file (lossy UTF-8), capped.
pub fn read_file(path: &str, limits: &ToolLimits) -> String {
    // Opening a FIFO would block the chat until some writer appears; a device has no end.
    if let Ok(m) = std::fs::metadata(path)
        && !m.is_file()
    {
        let what = if m.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
        return format!("error: cannot read {path}: it is {what}");
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("error: cannot open {path}: {e}"),
    };
    let total = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut kept = Vec::new();
    if let Err(e) = file.take(limits.max_output as u64 + 4).read_to_end(&mut kept) {
        return format!("error: cannot read {path}: {e}");
    }
    cap_output(&kept, total.max(kept.len()), limits.max_output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, secs: f64) -> ToolLimits {
        ToolLimits { max_output: max, timeout: Duration::from_secs_f64(secs) }
    }

    #[test]
    fn schemas_are_the_ones_the_builtin_model_was_trained_with() {
        // models/qwen35-moe-tiny-chat saw these definitions, in this key order, in every training
        // conversation with tools (scripts/train/make_chat_data.py reads the same file).
        let trained: Json = serde_json::from_str(include_str!("../../../testdata/chat/tools.json")).unwrap();
        assert_eq!(serde_json::to_string(&tool_schemas()).unwrap(), serde_json::to_string(&trained).unwrap());
    }

    #[test]
    fn bash_output_and_status() {
        let l = ToolLimits::default();
        assert_eq!(execute("bash", r#"{"command": "echo hi; echo err >&2; exit 3"}"#, &l), "hi\nerr\n[exit code 3]");
        assert_eq!(run_bash("true", &l), "[exit code 0]");
    }

    #[test]
    fn bash_output_is_capped() {
        let out = run_bash("yes abcdefgh | head -c 100000", &limits(1000, 10.0));
        assert!(out.starts_with("abcdefgh\nabcdefgh\n"));
        assert!(out.contains("[output truncated: 100000 bytes, first 1000 shown]"), "{out}");
        assert!(out.len() < 1100);
    }

    #[test]
    fn bash_times_out() {
        let t = Instant::now();
        let out = run_bash("echo start; sleep 30; echo never", &limits(1000, 0.5));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(out.starts_with("start\n[timed out after 0.5 s"), "{out}");
        // A background child holding the pipe does not hang the call.
        let t = Instant::now();
        let out = run_bash("(sleep 30 &) ; echo bg", &limits(1000, 10.0));
        assert!(t.elapsed() < Duration::from_secs(5), "{out}");
        assert!(out.starts_with("bg\n"), "{out}");
    }

    #[test]
    fn read_file_capped_and_errors() {
        let dir = std::env::temp_dir().join(format!("flashmoe-chat-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.txt");
        std::fs::write(&p, "é".repeat(600)).unwrap(); // 1200 bytes
        let out = read_file(p.to_str().unwrap(), &limits(101, 1.0));
        assert!(out.starts_with(&"é".repeat(50)), "{out}");
        assert!(out.ends_with("[output truncated: 1200 bytes, first 101 shown]"), "{out}");
        assert_eq!(read_file(p.to_str().unwrap(), &limits(5000, 1.0)), "é".repeat(600));
        assert!(read_file("/nonexistent/x", &ToolLimits::default()).starts_with("error: cannot open"));
        assert!(execute("read_file", "{}", &ToolLimits::default()).starts_with("error: `path`"));
        assert!(execute("nope", "{}", &ToolLimits::default()).starts_with("error: unknown tool"));
        assert!(execute("bash", "not json", &ToolLimits::default()).starts_with("error: the arguments"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tool_output_fits_half_the_context() {
        // The built-in model's 4,096 tokens: 6 KiB of output, about 1,800 of its tokens.
        assert_eq!(output_cap_for_context(4096), 6144);
        assert_eq!(output_cap_for_context(262_144), 393_216);
        assert_eq!(output_cap_for_context(10), 256);
    }
}
