//! Request limits beyond the body size: JSON nesting depth of request bodies (checked by a
//! byte scan before serde_json builds anything), a per-client token-bucket rate limit, and a
//! timeout on every request. Refusals are ordinary responses, so the envelope gives them an
//! OperationOutcome, audits and logs them like any other refusal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use super::AppState;
use super::envelope::is_json_type;
use super::response::ApiError;

/// The most clients the rate limiter remembers; beyond it, idle clients are forgotten first.
const MAX_CLIENTS: usize = 10_000;

/// Whether the JSON text `bytes` nests arrays and objects deeper than `max` (`{}` is depth
/// 1). Brackets inside strings do not count. Invalid JSON is left to the parser.
pub(crate) fn nests_deeper_than(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The middleware inside the envelope: the request timeout around the JSON depth check and
/// the handler.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let hardening = state.hardening();
    let timeout = hardening.request_timeout;
    let max_depth = hardening.max_json_depth;
    let max_body = state.max_body_bytes();
    match tokio::time::timeout(
        timeout,
        check_depth_then_run(max_depth, max_body, req, next),
    )
    .await
    {
        Ok(response) => response,
        Err(_) => {
            // The handler's future is dropped; a blocking task it started finishes on its
            // own thread, and its writes, if any, are complete and audited by the engine.
            let mut response = ApiError::http(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took longer than the server allows",
            )
            .into_response();
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

async fn check_depth_then_run(
    max_depth: usize,
    max_body: usize,
    req: Request,
    next: Next,
) -> Response {
    let json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type);
    if !json {
        // Handlers refuse bodies of other types (415) without parsing them.
        return next.run(req).await;
    }
    let declared_too_large = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|length| length > max_body as u64);
    if declared_too_large {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return StatusCode::PAYLOAD_TOO_LARGE.into_response();
        }
        Err(_) => {
            return ApiError::http(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the request body could not be read",
            )
            .into_response();
        }
    };
    if nests_deeper_than(&bytes, max_depth) {
        return ApiError::http(
            StatusCode::BAD_REQUEST,
            "too-costly",
            &format!("the JSON body nests deeper than {max_depth} levels"),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A token bucket per client: `rate` requests per second, bursts of up to `rate`.
#[derive(Debug, Clone)]
pub(crate) struct RateLimiter {
    rate: u32,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter of `rate` requests per second per client (at least 1).
    pub(crate) fn new(rate: u32) -> Self {
        RateLimiter {
            rate: rate.max(1),
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Takes one token of `client`'s bucket at `now`, or says how long until one is there.
    pub(crate) fn take(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.rate);
        // A poisoned lock only means another request panicked while holding it; the map
        // of buckets is still consistent (each update is one insert).
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(client) && buckets.len() >= MAX_CLIENTS {
            forget_idle(&mut buckets, now, rate);
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

/// Makes room in a full map: drops the buckets that have refilled (they behave exactly as
/// new ones), else the least recently used one.
fn forget_idle(buckets: &mut HashMap<String, Bucket>, now: Instant, rate: f64) {
    buckets.retain(|_, bucket| {
        bucket.tokens + now.saturating_duration_since(bucket.last).as_secs_f64() * rate < rate
    });
    if buckets.len() >= MAX_CLIENTS
        && let Some(oldest) = buckets
            .iter()
            .min_by_key(|(_, bucket)| bucket.last)
            .map(|(client, _)| client.clone())
    {
        buckets.remove(&oldest);
    }
}

/// The envelope's rate check: `None` to go on, else the 429 to answer. The client is the
/// token's subject when a valid token came (`authenticated`), else the source address.
pub(crate) fn throttle(
    state: &AppState,
    authenticated: bool,
    subject: &str,
    source: &str,
) -> Option<Response> {
    let limiter = state.hardening().rate_limiter.as_ref()?;
    let client = if authenticated {
        format!("sub:{subject}")
    } else {
        format!("ip:{source}")
    };
    let wait = limiter.take(&client, Instant::now()).err()?;
    let mut response = ApiError::http(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        "too many requests from this client; retry later",
    )
    .into_response();
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        response.headers_mut().insert(RETRY_AFTER, value);
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_scan_counts_brackets_outside_strings() {
        assert!(!nests_deeper_than(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nests_deeper_than(br#"{"a":[1,{"b":2}]}"#, 2));
        // Brackets in strings, escaped quotes included, are text.
        assert!(!nests_deeper_than(br#"{"a":"[[[{{{\"[[["}"#, 1));
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(nests_deeper_than(deep.as_bytes(), 64));
        assert!(!nests_deeper_than(deep.as_bytes(), 65));
    }

    #[test]
    fn bucket_refills_at_the_rate() {
        let limiter = RateLimiter::new(2);
        let start = Instant::now();
        assert!(limiter.take("a", start).is_ok());
        assert!(limiter.take("a", start).is_ok());
        let wait = limiter.take("a", start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        // Another client has its own bucket.
        assert!(limiter.take("b", start).is_ok());
        // Half a second later one token is back, not two.
        let later = start + Duration::from_millis(500);
        assert!(limiter.take("a", later).is_ok());
        assert!(limiter.take("a", later).is_err());
    }

    #[test]
    fn the_map_of_clients_stays_bounded() {
        let limiter = RateLimiter::new(1);
        let start = Instant::now();
        for i in 0..MAX_CLIENTS + 10 {
            assert!(limiter.take(&format!("c{i}"), start).is_ok());
        }
        let len = limiter.buckets.lock().unwrap().len();
        assert!(len <= MAX_CLIENTS, "{len} clients remembered");
        // The newest client is still limited.
        let last = format!("c{}", MAX_CLIENTS + 9);
        assert!(limiter.take(&last, start).is_err());
    }
}
