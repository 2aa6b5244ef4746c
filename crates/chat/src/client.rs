//! HTTP side of the chat client: `GET /v1/models`, `GET /health`, and a streamed
//! `POST /v1/chat/completions` assembled into a [`Reply`].

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value as Json, json};

use crate::sse::{ChunkDelta, SseParser, parse_chunk};

/// A piece of the reply as it streams in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    Content(&'a str),
    Reasoning(&'a str),
    /// A tool call was announced (its arguments follow).
    ToolCall {
        index: usize,
        name: &'a str,
    },
}

/// A tool call of a reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyToolCall {
    pub id: String,
    pub name: String,
    /// The arguments JSON text, as the server sent it.
    pub arguments: String,
}

/// A whole assistant reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ReplyToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<Json>,
}

impl Reply {
    /// Folds one streamed chunk in, reporting what it adds to `on`.
    pub fn apply(&mut self, d: &ChunkDelta, on: &mut dyn FnMut(Piece)) -> Result<()> {
        if let Some(e) = &d.error {
            bail!("the server reported an error: {e}");
        }
        if let Some(r) = d.reasoning.as_deref().filter(|r| !r.is_empty()) {
            self.reasoning.push_str(r);
            on(Piece::Reasoning(r));
        }
        if let Some(c) = d.content.as_deref().filter(|c| !c.is_empty()) {
            self.content.push_str(c);
            on(Piece::Content(c));
        }
        for t in &d.tool_calls {
            let pos = t.index;
            if pos > 1024 {
                bail!("tool call index {pos} out of range");
            }
            if pos >= self.tool_calls.len() {
                self.tool_calls.resize_with(pos + 1, ReplyToolCall::default);
            }
            let call = &mut self.tool_calls[pos];
            if let Some(id) = &t.id {
                call.id = id.clone();
            }
            if let Some(name) = t.name.as_deref().filter(|n| !n.is_empty()) {
                let announce = call.name.is_empty();
                call.name.push_str(name);
                if announce {
                    on(Piece::ToolCall { index: pos, name });
                }
            }
            if let Some(a) = &t.arguments {
                call.arguments.push_str(a);
            }
        }
        if let Some(f) = &d.finish_reason {
            self.finish_reason = Some(f.clone());
        }
        if let Some(u) = &d.usage {
            self.usage = Some(u.clone());
        }
        Ok(())
    }

    /// Fills in what a server may leave out (ids, empty arguments).
    pub fn finalize(&mut self) {
        self.tool_calls.retain(|c| !c.name.is_empty());
        for (i, c) in self.tool_calls.iter_mut().enumerate() {
            if c.id.is_empty() {
                c.id = format!("call_{}_{i}", rand::random::<u32>());
            }
            if c.arguments.trim().is_empty() {
                c.arguments = "{}".into();
            }
        }
    }

    /// The assistant message to store and send back.
    pub fn to_message(&self) -> Json {
        let mut m = json!({"role": "assistant", "content": self.content});
        if !self.reasoning.is_empty() {
            m["reasoning_content"] = json!(self.reasoning);
        }
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect();
        }
        m
    }
}

/// The error of a request that reached no server; when nothing listens there, how to start one.
fn unreachable(base: &str, e: ureq::Error) -> anyhow::Error {
    let refused = match &e {
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        ureq::Error::ConnectionFailed => true,
        _ => false,
    };
    if refused {
        anyhow!(
            "no server at {base} (connection refused): start one with `flashmoe serve --model DIR` in another terminal, or let chat run the model itself with `flashmoe chat --model DIR`"
        )
    } else {
        anyhow!("cannot reach {base}: {e}")
    }
}

/// Client of one OpenAI-compatible server.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
}

impl Client {
    /// `url`: the server's base URL, with or without a trailing `/v1`.
    pub fn new(url: &str, api_key: Option<String>) -> Self {
        let mut base = url.trim_end_matches('/').to_string();
        if let Some(b) = base.strip_suffix("/v1") {
            base = b.to_string();
        }
        if !base.contains("://") {
            base = format!("http://{base}");
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(None)
            .build();
        Self { agent: config.into(), base, api_key }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn auth(&self) -> Option<String> {
        self.api_key.as_ref().map(|k| format!("Bearer {k}"))
    }

    /// Whether `GET /health` answers 200.
    pub fn healthy(&self) -> bool {
        self.agent.get(format!("{}/health", self.base)).call().is_ok_and(|r| r.status().as_u16() == 200)
    }

    /// The first model id of `GET /v1/models`.
    pub fn first_model(&self) -> Result<String> {
        Ok(self.model_card(None)?.0)
    }

    /// `model` (or the first model) of `GET /v1/models`, with its context length when the
    /// server reports one (`max_model_len`, as flashmoe and vLLM do).
    pub fn model_card(&self, model: Option<&str>) -> Result<(String, Option<usize>)> {
        let mut req = self.agent.get(format!("{}/v1/models", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.call().map_err(|e| unreachable(&self.base, e))?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        if status != 200 {
            bail!("GET /v1/models: {}", error_text(status, &text));
        }
        let v: Json = serde_json::from_str(&text).context("GET /v1/models: not JSON")?;
        let cards = v["data"].as_array().cloned().unwrap_or_default();
        let card = match model {
            Some(m) => cards.iter().find(|c| c["id"] == m).cloned().unwrap_or_else(|| json!({"id": m})),
            None => cards.first().cloned().ok_or_else(|| anyhow!("GET /v1/models lists no model"))?,
        };
        let id =
            card["id"].as_str().map(str::to_string).ok_or_else(|| anyhow!("GET /v1/models: a model without an id"))?;
        Ok((id, card["max_model_len"].as_u64().map(|n| n as usize)))
    }

    /// Streams a chat completion (`body` gets `stream: true`), calling `on` as pieces arrive.
    pub fn stream_chat(&self, body: &Json, on: &mut dyn FnMut(Piece)) -> Result<Reply> {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let mut req = self
            .agent
            .post(format!("{}/v1/chat/completions", self.base))
            .header("Content-Type", "application/json")
            .header("Accept", "text/event-stream");
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req.send(body.to_string()).map_err(|e| unreachable(&self.base, e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            let text = resp.into_body().read_to_string().unwrap_or_default();
            bail!("{}", error_text(status, &text));
        }
        let mut reader = resp.into_body().into_reader();
        let mut parser = SseParser::new();
        let mut reply = Reply::default();
        let mut buf = [0u8; 4096];
        let mut done = false;
        while !done {
            let n = reader.read(&mut buf).context("reading the stream")?;
            let events = if n == 0 { parser.finish() } else { parser.feed(&buf[..n]) };
            for ev in events {
                if ev.data.trim() == "[DONE]" {
                    done = true;
                    break;
                }
                let d = parse_chunk(&ev.data).map_err(|e| anyhow!(e))?;
                reply.apply(&d, on)?;
            }
            if n == 0 {
                break;
            }
        }
        reply.finalize();
        Ok(reply)
    }
}

/// `STATUS: message` from an OpenAI- or Anthropic-style error body (or the raw text).
pub fn error_text(status: u16, body: &str) -> String {
    let msg = serde_json::from_str::<Json>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(300).collect());
    format!("HTTP {status}: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::parse_chunk;

    #[test]
    fn assembles_streamed_reply() {
        let chunks = [
            r#"{"choices":[{"delta":{"role":"assistant","reasoning_content":"think"}}]}"#,
            r#"{"choices":[{"delta":{"content":"Let me run it."}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"bash","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"command\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"echo hi\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"name":"read_file"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#,
        ];
        let mut reply = Reply::default();
        let mut pieces = Vec::new();
        for c in chunks {
            reply
                .apply(&parse_chunk(c).unwrap(), &mut |p| {
                    pieces.push(format!("{p:?}"));
                })
                .unwrap();
        }
        reply.finalize();
        assert_eq!(
            pieces,
            [
                "Reasoning(\"think\")",
                "Content(\"Let me run it.\")",
                "ToolCall { index: 0, name: \"bash\" }",
                "ToolCall { index: 1, name: \"read_file\" }"
            ]
        );
        assert_eq!(reply.content, "Let me run it.");
        assert_eq!(
            reply.tool_calls[0],
            ReplyToolCall { id: "call_a".into(), name: "bash".into(), arguments: "{\"command\":\"echo hi\"}".into() }
        );
        assert_eq!(reply.tool_calls[1].arguments, "{}");
        assert!(reply.tool_calls[1].id.starts_with("call_"));
        assert_eq!(reply.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(reply.usage.as_ref().unwrap()["completion_tokens"], 7);
        let m = reply.to_message();
        assert_eq!(m["reasoning_content"], "think");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "bash");
        let err = Reply::default().apply(&parse_chunk(r#"{"error":{"message":"x"}}"#).unwrap(), &mut |_| {});
        assert!(err.is_err());
    }

    #[test]
    fn error_bodies_and_urls() {
        assert_eq!(error_text(400, r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#), "HTTP 400: bad");
        assert_eq!(error_text(502, "gateway"), "HTTP 502: gateway");
        assert_eq!(Client::new("http://h:1/v1/", None).base_url(), "http://h:1");
        assert_eq!(Client::new("127.0.0.1:8000", None).base_url(), "http://127.0.0.1:8000");
    }

    /// A real socket: a one-shot HTTP server that streams a canned SSE reply.
    #[test]
    fn streams_over_http() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            std::io::Read::read_exact(&mut r, &mut body).unwrap();
            let req: Json = serde_json::from_slice(&body).unwrap();
            assert_eq!(req["stream"], true);
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n").unwrap();
            for part in [
                ": ping\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
                "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n",
            ] {
                s.write_all(part.as_bytes()).unwrap();
                s.flush().unwrap();
            }
        });
        let c = Client::new(&format!("http://{addr}"), Some("k".into()));
        let mut seen = String::new();
        let reply = c
            .stream_chat(&json!({"model": "m", "messages": []}), &mut |p| {
                if let Piece::Content(t) = p {
                    seen.push_str(t);
                }
            })
            .unwrap();
        assert_eq!(reply.content, "Hello");
        assert_eq!(seen, "Hello");
        server.join().unwrap();
    }
}
