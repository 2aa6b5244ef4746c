//! Server-Sent Events: framing (`data:` lines, blank-line separated events, `:` comments) and
//! the OpenAI `chat.completion.chunk` deltas carried in them.

use serde_json::Value as Json;

/// Splits a byte stream into SSE events; feed it whatever the socket gives.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
    event: Option<String>,
}

/// One complete SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            self.line(&line, &mut out);
        }
        out
    }

    /// End of stream: an event not followed by a blank line still counts.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            self.line(rest.trim_end_matches('\r'), &mut out);
        }
        self.line("", &mut out);
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                out.push(SseEvent { event: self.event.take(), data: std::mem::take(&mut self.data).join("\n") });
            }
            self.event = None;
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => self.data.push(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
    }
}

/// What one streamed chunk adds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkDelta {
    pub content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    pub finish_reason: Option<String>,
    /// `usage` (with `stream_options.include_usage`).
    pub usage: Option<Json>,
    /// An `error` object sent in the stream.
    pub error: Option<String>,
}

/// A piece of a streamed tool call (`choices[0].delta.tool_calls[i]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: Option<String>,
}

/// Parses the JSON of one `data:` line. `[DONE]` is the caller's business.
pub fn parse_chunk(data: &str) -> Result<ChunkDelta, String> {
    let v: Json = serde_json::from_str(data).map_err(|e| format!("bad chunk JSON ({e}): {data}"))?;
    let mut d = ChunkDelta::default();
    if let Some(err) = v.get("error") {
        d.error = Some(err.get("message").and_then(Json::as_str).map_or_else(|| err.to_string(), str::to_string));
        return Ok(d);
    }
    d.usage = v.get("usage").filter(|u| !u.is_null()).cloned();
    let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else { return Ok(d) };
    d.finish_reason = choice.get("finish_reason").and_then(Json::as_str).map(str::to_string);
    let Some(delta) = choice.get("delta") else { return Ok(d) };
    let s = |k: &str| delta.get(k).and_then(Json::as_str).map(str::to_string);
    d.content = s("content");
    d.reasoning = s("reasoning_content").or_else(|| s("reasoning"));
    if let Some(calls) = delta.get("tool_calls").and_then(Json::as_array) {
        for (i, c) in calls.iter().enumerate() {
            let f = c.get("function");
            d.tool_calls.push(ToolCallDelta {
                index: c.get("index").and_then(Json::as_u64).map_or(i, |x| x as usize),
                id: c.get("id").and_then(Json::as_str).map(str::to_string),
                name: f.and_then(|f| f.get("name")).and_then(Json::as_str).map(str::to_string),
                arguments: f.and_then(|f| f.get("arguments")).and_then(Json::as_str).map(str::to_string),
            });
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_events_in_any_chunking() {
        let stream = b": keep-alive\n\ndata: {\"a\":1}\n\nevent: ping\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let want = vec![
            SseEvent { event: None, data: "{\"a\":1}".into() },
            SseEvent { event: Some("ping".into()), data: "x\ny".into() },
            SseEvent { event: None, data: "[DONE]".into() },
        ];
        let mut p = SseParser::new();
        let mut got = p.feed(stream);
        got.extend(p.finish());
        assert_eq!(got, want);
        let mut p = SseParser::new();
        let mut got = Vec::new();
        for b in stream.iter() {
            got.extend(p.feed(std::slice::from_ref(b)));
        }
        got.extend(p.finish());
        assert_eq!(got, want);
        // A last event without its blank line.
        let mut p = SseParser::new();
        let mut got = p.feed(b"data: tail");
        got.extend(p.finish());
        assert_eq!(got, vec![SseEvent { event: None, data: "tail".into() }]);
    }

    #[test]
    fn parses_chunks() {
        let d = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"content":"Hi","reasoning_content":null},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(d.content.as_deref(), Some("Hi"));
        assert_eq!(d.reasoning, None);
        let d = parse_chunk(r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_x","type":"function","function":{"name":"bash","arguments":""}}]}}]}"#).unwrap();
        assert_eq!(
            d.tool_calls,
            vec![ToolCallDelta {
                index: 1,
                id: Some("call_x".into()),
                name: Some("bash".into()),
                arguments: Some(String::new())
            }]
        );
        let d =
            parse_chunk(r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}],"usage":{"completion_tokens":3}}"#)
                .unwrap();
        assert_eq!(d.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(d.usage.unwrap()["completion_tokens"], 3);
        let d = parse_chunk(r#"{"error":{"message":"boom","type":"server_error"}}"#).unwrap();
        assert_eq!(d.error.as_deref(), Some("boom"));
        assert!(parse_chunk("{oops").is_err());
    }
}
