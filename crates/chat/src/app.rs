//! The interactive loop of `flashmoe chat`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;
use serde_json::{Value as Json, json};

use crate::client::{Client, Piece};
use crate::markdown::Markdown;
use crate::store::{self, Conversation};
use crate::terminal::sanitize;
use crate::tools::{self, REFUSED, ToolLimits};

/// Settings of a chat session.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of an OpenAI-compatible server.
    pub url: String,
    pub api_key: Option<String>,
    /// Model name to send; `None`: the first of `/v1/models`.
    pub model: Option<String>,
    /// Conversation to continue.
    pub resume: Option<String>,
    /// System prompt (replaces the resumed conversation's).
    pub system: Option<String>,
    /// Render the template with `enable_thinking=false`.
    pub no_think: bool,
    /// Thinking tokens before the server closes `</think>`.
    pub think_budget: Option<usize>,
    /// Run tool calls without asking.
    pub auto_approve: bool,
    /// Show the model's thinking (dimmed).
    pub show_thinking: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    /// Sampling seed sent with every request.
    pub seed: Option<u64>,
    /// Where conversations and the line history live ([`store::data_dir`]).
    pub data_dir: PathBuf,
    pub limits: ToolLimits,
}

impl Options {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            api_key: None,
            model: None,
            resume: None,
            system: None,
            no_think: false,
            think_budget: None,
            auto_approve: false,
            show_thinking: true,
            max_tokens: None,
            temperature: None,
            seed: None,
            data_dir: store::data_dir(),
            limits: ToolLimits::default(),
        }
    }
}

/// Most model round trips (tool call → result → …) for one user message.
const MAX_ROUNDS: usize = 32;
/// Lines of a tool result echoed on the terminal (the model gets all of it, up to the cap).
const SHOWN_RESULT_LINES: usize = 12;

const HELP: &str = "\
Commands:
  /new              start a new conversation
  /resume [ID]      continue a saved conversation (without ID: list them)
  /system [TEXT]    show or set the system prompt (/system off removes it)
  /tools [auto|ask] list the tools; switch approval (auto: run without asking)
  /think            show or hide the model's thinking
  /help             this help
  /quit             leave (also Ctrl-D)";

struct Ui {
    color: bool,
}

impl Ui {
    fn paint(&self, code: &str, text: &str) -> String {
        // Everything shown goes through here or through `sanitize` below: text from the model,
        // its tools or the server never reaches the terminal with its control characters.
        let text = sanitize(text);
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.into_owned() }
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
    fn note(&self, t: &str) {
        println!("{}", self.dim(t));
    }
    fn error(&self, t: &str) {
        println!("{}", self.paint("31", &format!("error: {t}")));
    }
}

struct Session {
    opts: Options,
    client: Client,
    model: String,
    conv: Conversation,
    ui: Ui,
}

/// Runs the interactive chat until /quit or end of input.
pub fn run(opts: Options) -> Result<()> {
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let ui = Ui { color };
    let client = Client::new(&opts.url, opts.api_key.clone());
    // A server that does not list models (or not this one) still gets the conversation.
    let (model, context) = match client.model_card(opts.model.as_deref()) {
        Ok(card) => card,
        Err(e) => match &opts.model {
            Some(m) => (m.clone(), None),
            None => return Err(e),
        },
    };
    let tool_cap = context.map(tools::output_cap_for_context);
    let capped = tool_cap.filter(|&c| c < opts.limits.max_output);
    let mut conv = match &opts.resume {
        Some(id) => Conversation::load(&opts.data_dir, id)?,
        None => Conversation::new(&opts.data_dir),
    };
    if let Some(s) = &opts.system
        && conv.system() != Some(s.as_str())
    {
        conv.set_system(Some(s))?;
    }
    let mut s = Session { opts, client, model, conv, ui };

    println!("{}", s.ui.paint("1", &format!("flashmoe chat · {} · {}", s.model, s.client.base_url())));
    if s.opts.resume.is_some() {
        s.print_history();
    }
    s.ui.note(&format!("conversation {} · /help for commands", s.conv.id));
    if let (Some(cap), Some(n)) = (capped, context) {
        // A tool output longer than the model's context would make this and every later
        // request of the conversation fail.
        s.opts.limits.max_output = cap;
        s.ui.note(&format!("tool output to the model capped at {cap} bytes (half of the model's {n}-token context)"));
    }

    let mut rl = DefaultEditor::new()?;
    let history = s.opts.data_dir.join("chat_history.txt");
    let _ = rl.load_history(&history);
    loop {
        let line = match rl.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(text);
        if text.starts_with('/') {
            match s.command(text) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => s.ui.error(&format!("{e:#}")),
            }
            continue;
        }
        if let Err(e) = s.conv.push(json!({"role": "user", "content": text})) {
            s.ui.error(&format!("{e:#}"));
            continue;
        }
        if let Err(e) = s.turn(&mut rl) {
            s.ui.error(&format!("{e:#}"));
        }
    }
    if std::fs::create_dir_all(&s.opts.data_dir).is_ok() {
        let _ = rl.save_history(&history);
    }
    if !s.conv.messages.is_empty() {
        s.ui.note(&format!("saved as {0} · resume with: flashmoe chat --resume {0}", s.conv.id));
    }
    Ok(())
}

impl Session {
    /// Handles a slash command; true to quit.
    fn command(&mut self, line: &str) -> Result<bool> {
        let (cmd, arg) = line.split_once(char::is_whitespace).map_or((line, ""), |(c, a)| (c, a.trim()));
        match cmd {
            "/quit" | "/exit" | "/q" => return Ok(true),
            "/help" | "/?" => println!("{HELP}"),
            "/new" => {
                let system = self.conv.system().map(str::to_string);
                self.conv = Conversation::new(&self.opts.data_dir);
                if let Some(s) = system {
                    self.conv.set_system(Some(&s))?;
                }
                self.ui.note(&format!("new conversation {}", self.conv.id));
            }
            "/resume" if arg.is_empty() => {
                let list = store::list(&self.opts.data_dir);
                if list.is_empty() {
                    self.ui.note("no saved conversations");
                }
                for (id, n, first) in list.into_iter().take(15) {
                    println!("  {id}  {}  {first}", self.ui.dim(&format!("{n:>3} msgs")));
                }
            }
            "/resume" => {
                self.conv = Conversation::load(&self.opts.data_dir, arg)?;
                self.print_history();
                self.ui.note(&format!("resumed conversation {}", self.conv.id));
            }
            "/system" if arg.is_empty() => match self.conv.system() {
                Some(s) => println!("{s}"),
                None => self.ui.note("no system prompt"),
            },
            "/system" => {
                let off = matches!(arg, "off" | "none" | "clear");
                self.conv.set_system(if off { None } else { Some(arg) })?;
                self.ui.note(if off { "system prompt removed" } else { "system prompt set" });
            }
            "/tools" => {
                match arg {
                    "auto" => self.opts.auto_approve = true,
                    "ask" => self.opts.auto_approve = false,
                    "" => {}
                    _ => anyhow::bail!("usage: /tools [auto|ask]"),
                }
                for t in tools::tool_schemas().as_array().into_iter().flatten() {
                    let f = &t["function"];
                    println!(
                        "  {}  {}",
                        self.ui.paint("1", f["name"].as_str().unwrap_or("")),
                        f["description"].as_str().unwrap_or("")
                    );
                }
                self.ui.note(if self.opts.auto_approve {
                    "calls run without asking (/tools ask to confirm each)"
                } else {
                    "each call asks for approval (/tools auto to run without asking)"
                });
            }
            "/think" => {
                self.opts.show_thinking = !self.opts.show_thinking;
                self.ui.note(if self.opts.show_thinking { "thinking shown" } else { "thinking hidden" });
            }
            _ => anyhow::bail!("unknown command {cmd} (/help lists them)"),
        }
        Ok(false)
    }

    fn request_body(&self) -> Json {
        let mut body = json!({
            "model": self.model,
            "messages": self.conv.messages,
            "tools": tools::tool_schemas(),
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.opts.no_think {
            body["chat_template_kwargs"] = json!({"enable_thinking": false});
        }
        if let Some(n) = self.opts.think_budget {
            body["think_budget"] = json!(n);
        }
        if let Some(n) = self.opts.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if let Some(t) = self.opts.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(s) = self.opts.seed {
            body["seed"] = json!(s);
        }
        body
    }

    /// Generates until the model answers without tool calls.
    fn turn(&mut self, rl: &mut DefaultEditor) -> Result<()> {
        for _ in 0..MAX_ROUNDS {
            let reply = self.generate()?;
            self.conv.push(reply.to_message())?;
            if reply.tool_calls.is_empty() {
                return Ok(());
            }
            for call in &reply.tool_calls {
                let args: Json = serde_json::from_str(&call.arguments).unwrap_or(Json::String(call.arguments.clone()));
                println!("{} {}", self.ui.paint("33", "⚙"), self.ui.paint("1", &tools::describe(&call.name, &args)));
                let approved = self.opts.auto_approve || ask(rl)?;
                let result = if approved {
                    let r = tools::execute(&call.name, &call.arguments, &self.opts.limits);
                    self.show_result(&r);
                    r
                } else {
                    println!("{}", self.ui.paint("31", "✗ refused"));
                    REFUSED.to_string()
                };
                self.conv.push(json!({"role": "tool", "tool_call_id": call.id, "content": result}))?;
            }
        }
        self.ui.note(&format!("stopped after {MAX_ROUNDS} tool rounds"));
        Ok(())
    }

    /// One streamed completion, printed as it arrives.
    fn generate(&mut self) -> Result<crate::client::Reply> {
        let body = self.request_body();
        let mut md = Markdown::new(self.ui.color);
        let mut in_reasoning = false;
        let mut wrote_reasoning = false;
        let mut wrote_content = false;
        let show_thinking = self.opts.show_thinking;
        let color = self.ui.color;
        let start = Instant::now();
        let mut out = std::io::stdout();
        let result = self.client.stream_chat(&body, &mut |p| {
            match p {
                Piece::Reasoning(t) if show_thinking => {
                    if !in_reasoning {
                        in_reasoning = true;
                        if color {
                            let _ = write!(out, "\x1b[2m");
                        }
                    }
                    wrote_reasoning = true;
                    let _ = write!(out, "{}", sanitize(t));
                }
                Piece::Reasoning(_) => {}
                Piece::Content(t) => {
                    if in_reasoning {
                        in_reasoning = false;
                        let _ = write!(out, "{}\n\n", if color { "\x1b[0m" } else { "" });
                    }
                    wrote_content = true;
                    let _ = write!(out, "{}", md.push(&sanitize(t)));
                }
                Piece::ToolCall { .. } => {}
            }
            let _ = out.flush();
        });
        if in_reasoning && color {
            print!("\x1b[0m");
        }
        let tail = md.finish();
        print!("{tail}");
        if wrote_content || wrote_reasoning {
            println!();
        }
        let reply = result?;
        if let Some(n) = reply.usage.as_ref().and_then(|u| u["completion_tokens"].as_u64()) {
            let secs = start.elapsed().as_secs_f64();
            self.ui.note(&format!("[{n} tokens · {secs:.1} s · {:.1} tok/s]", n as f64 / secs.max(1e-9)));
        }
        Ok(reply)
    }

    fn show_result(&self, result: &str) {
        let lines: Vec<&str> = result.lines().collect();
        for l in lines.iter().take(SHOWN_RESULT_LINES) {
            println!("{}", self.ui.dim(&format!("  │ {l}")));
        }
        if lines.len() > SHOWN_RESULT_LINES {
            self.ui.note(&format!("  │ … {} more lines", lines.len() - SHOWN_RESULT_LINES));
        }
    }

    fn print_history(&self) {
        for m in &self.conv.messages {
            let content = m["content"].as_str().unwrap_or("");
            match m["role"].as_str().unwrap_or("") {
                "system" => self.ui.note(&format!("system: {content}")),
                "user" => println!("{} {}", self.ui.paint("1;32", ">"), sanitize(content)),
                "assistant" => {
                    if self.opts.show_thinking
                        && let Some(r) = m["reasoning_content"].as_str()
                    {
                        println!("{}", self.ui.dim(r.trim()));
                    }
                    if !content.trim().is_empty() {
                        println!("{}", Markdown::render(&sanitize(content.trim()), self.ui.color));
                    }
                    for c in m["tool_calls"].as_array().into_iter().flatten() {
                        let f = &c["function"];
                        let args =
                            f["arguments"].as_str().and_then(|a| serde_json::from_str(a).ok()).unwrap_or(Json::Null);
                        println!(
                            "{} {}",
                            self.ui.paint("33", "⚙"),
                            sanitize(&tools::describe(f["name"].as_str().unwrap_or("?"), &args))
                        );
                    }
                }
                "tool" => self.show_result(content),
                _ => {}
            }
        }
    }
}

/// Asks whether to run a call (y/N).
fn ask(rl: &mut DefaultEditor) -> Result<bool> {
    loop {
        match rl.readline("Run it? [y/N] ") {
            Ok(a) => match a.trim().to_ascii_lowercase().as_str() {
                "y" | "yes" => return Ok(true),
                "" | "n" | "no" => return Ok(false),
                _ => continue,
            },
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}
