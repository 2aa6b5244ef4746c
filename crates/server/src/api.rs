//! Error bodies (OpenAI and Anthropic shapes) and request field checks shared by the endpoints.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json, json};

/// Which API's error shape to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error": {"message", "type", "param", "code"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
}

impl Flavor {
    pub fn of_path(path: &str) -> Flavor {
        if path.starts_with("/v1/messages") { Flavor::Anthropic } else { Flavor::OpenAi }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    pub flavor: Flavor,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, code: None, flavor: Flavor::OpenAi }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }
    pub fn code(mut self, c: impl Into<String>) -> Self {
        self.code = Some(c.into());
        self
    }
    pub fn flavor(mut self, f: Flavor) -> Self {
        self.flavor = f;
        self
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The error body (also sent as an SSE event when a stream fails midway).
    pub fn body(&self) -> Json {
        match self.flavor {
            Flavor::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.openai_type(),
                "param": self.param,
                "code": self.code,
            }}),
            Flavor::Anthropic => json!({"type": "error", "error": {
                "type": self.anthropic_type(),
                "message": self.message,
            }}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Parses a request body: a JSON object, or a 400 that says what is wrong.
pub fn parse_body(body: &[u8]) -> ApiResult<Map<String, Json>> {
    let v: Json = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!("We could not parse the JSON body of your request: {e}")).code("invalid_json")
    })?;
    match v {
        Json::Object(m) => Ok(m),
        other => {
            Err(ApiError::bad(format!("The request body must be a JSON object, got {}", kind(&other)))
                .code("invalid_json"))
        }
    }
}

pub fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn wrong(field: &str, want: &str, got: &Json) -> ApiError {
    ApiError::bad(format!("Invalid type for '{field}': expected {want}, but got {}.", kind(got)))
        .param(field)
        .code("invalid_type")
}

pub fn missing(field: &str) -> ApiError {
    ApiError::bad(format!("Missing required parameter: '{field}'.")).param(field).code("missing_required_parameter")
}

/// Typed accessors: `None` when absent or null, an error when of the wrong type.
pub struct Fields<'a>(pub &'a Map<String, Json>);

impl<'a> Fields<'a> {
    pub fn get(&self, k: &str) -> Option<&'a Json> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    pub fn str(&self, k: &str) -> ApiResult<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(k, "a string", v)),
        }
    }
    pub fn req_str(&self, k: &str) -> ApiResult<&'a str> {
        self.str(k)?.ok_or_else(|| missing(k))
    }
    pub fn bool(&self, k: &str) -> ApiResult<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(k, "a boolean", v)),
        }
    }
    pub fn f64(&self, k: &str) -> ApiResult<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(wrong(k, "a number", v)),
        }
    }
    /// A number within [lo, hi].
    pub fn f64_in(&self, k: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
        let v = self.f64(k)?;
        if let Some(x) = v
            && !(lo..=hi).contains(&x)
        {
            return Err(ApiError::bad(format!("'{k}' must be between {lo} and {hi}, got {x}."))
                .param(k)
                .code("invalid_value"));
        }
        Ok(v)
    }
    /// A number in (0, hi]: for fields where 0 has no meaning (a repetition penalty of 0 would
    /// divide by zero; the sampler would silently ignore it).
    pub fn f64_positive(&self, k: &str, hi: f64) -> ApiResult<Option<f64>> {
        let v = self.f64_in(k, 0.0, hi)?;
        if v == Some(0.0) {
            return Err(ApiError::bad(format!("'{k}' must be greater than 0 and at most {hi}, got 0."))
                .param(k)
                .code("invalid_value"));
        }
        Ok(v)
    }
    pub fn u64(&self, k: &str) -> ApiResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Number(n)) => match n.as_u64() {
                Some(x) => Ok(Some(x)),
                None if n.as_i64().is_some() => {
                    Err(ApiError::bad(format!("'{k}' must be non-negative, got {n}.")).param(k).code("invalid_value"))
                }
                None => Err(wrong(k, "an integer", &Json::Number(n.clone()))),
            },
            Some(v) => Err(wrong(k, "an integer", v)),
        }
    }
    /// A seed: any integer (negative ones are taken as their two's-complement bits).
    pub fn seed(&self, k: &str) -> ApiResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Json::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64().map(|x| x as u64)),
            Some(v) => Err(wrong(k, "an integer", v)),
        }
    }
    /// A positive integer.
    pub fn count(&self, k: &str) -> ApiResult<Option<usize>> {
        match self.u64(k)? {
            Some(0) => Err(ApiError::bad(format!("'{k}' must be at least 1.")).param(k).code("invalid_value")),
            v => Ok(v.map(|x| x as usize)),
        }
    }
    pub fn array(&self, k: &str) -> ApiResult<Option<&'a Vec<Json>>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong(k, "an array", v)),
        }
    }
    pub fn object(&self, k: &str) -> ApiResult<Option<&'a Map<String, Json>>> {
        match self.get(k) {
            None => Ok(None),
            Some(Json::Object(o)) => Ok(Some(o)),
            Some(v) => Err(wrong(k, "an object", v)),
        }
    }
    /// A string or an array of strings (OpenAI `stop`, Anthropic `stop_sequences`).
    /// Bounded (at most [`MAX_STOP_STRINGS`] of at most [`MAX_STOP_BYTES`] bytes, none empty):
    /// every generated token is checked against each, so megabytes of them would slow every
    /// request on the one engine thread.
    pub fn strings(&self, k: &str) -> ApiResult<Vec<String>> {
        let list: Vec<String> = match self.get(k) {
            None | Some(Json::Null) => return Ok(Vec::new()),
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(|| wrong(k, "an array of strings", x)))
                .collect::<ApiResult<_>>()?,
            Some(v) => return Err(wrong(k, "a string or an array of strings", v)),
        };
        if list.len() > MAX_STOP_STRINGS {
            return Err(
                ApiError::bad(format!("'{k}': at most {MAX_STOP_STRINGS} strings, got {}.", list.len())).param(k)
            );
        }
        if let Some(s) = list.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            let why =
                if s.is_empty() { "an empty string".to_string() } else { format!("a string of {} bytes", s.len()) };
            return Err(ApiError::bad(format!("'{k}': {why}; each must be 1 to {MAX_STOP_BYTES} bytes.")).param(k));
        }
        Ok(list)
    }
}

/// Most stop strings a request may give (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 512;

/// A random id with a prefix (`chatcmpl-…`, `msg_…`).
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let s: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{s}")
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Who sent a request, as far as the server can tell: the API key it came with (its index among
/// `--api-key`s; None without keys). Saved conversation states are scoped per client and per
/// the `user` the request names ([`Client::cache_scope`]), so one client's prompt never speeds
/// up (and so reveals itself to) another's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Client {
    pub key: Option<usize>,
}

impl Client {
    /// The prefix-cache scope of a request from this client naming `user` (OpenAI `user`,
    /// Anthropic `metadata.user_id`; none: ""). Without keys a single local user is assumed and
    /// only `user` separates conversations.
    pub fn cache_scope(&self, user: Option<&str>) -> String {
        let key = self.key.map_or_else(|| "-".to_string(), |k| k.to_string());
        let user = user.unwrap_or("");
        // Length-prefixed: no (key, user) pair can spell another's scope.
        format!("{key}:{}:{user}", user.len())
    }
}
