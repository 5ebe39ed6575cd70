//! Ranged GETs over HTTP(S), one attempt each, with every answer sorted
//! into what a retry may fix and what it cannot.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::error::{Error, Result};

/// Phase timeouts of one request (the whole read is bounded by the retry
/// deadline, `--remote-timeout`): a dead host fails fast, a server that
/// sends nothing for this long is given up on and asked again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(15);
const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Kept-alive connections per host: the read-ahead and the FUSE threads
/// each hold one while they fetch.
const CONNECTIONS_PER_HOST: usize = 16;

/// How TLS is checked.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// PEM roots to trust instead of the system's (`--ca-file`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Verify nothing (`--insecure`).
    pub insecure: bool,
}

/// Why one attempt failed.
#[derive(Clone, Debug)]
pub enum Failure {
    /// Worth another try: connection errors, timeouts, 5xx, 429, bodies cut
    /// short. `after` is the server's `Retry-After`.
    Transient { why: String, after: Option<Duration> },
    /// The object is no longer the version that was opened (412, or a new
    /// size).
    Changed(String),
    /// Retrying will not help (403, 404, a server that ignores Range...).
    Fatal(String),
}

impl Failure {
    /// The one-line reason.
    pub fn why(&self) -> &str {
        match self {
            Failure::Transient { why, .. } | Failure::Changed(why) | Failure::Fatal(why) => why,
        }
    }
}

/// What a ranged GET learned about the object.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The object's size, from Content-Range (or Content-Length of a whole
    /// object).
    pub total: u64,
    pub etag: Option<String>,
    pub modified: Option<SystemTime>,
    /// Bytes written into the buffer (less than asked only at the end of
    /// the object).
    pub filled: usize,
    /// Where redirects led, when they did.
    pub redirected: Option<String>,
}

pub struct Http {
    agent: ureq::Agent,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Http")
    }
}

impl Http {
    /// An agent whose phase timeouts fit within `bound`, the most one read
    /// may take.
    pub fn new(tls: &TlsOptions, bound: Duration) -> Result<Http> {
        let mut tls_config = TlsConfig::builder().root_certs(RootCerts::PlatformVerifier);
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| Error::open(path, format!("not a PEM certificate file: {e}")))?;
            if certs.is_empty() {
                return Err(Error::open(path, "--ca-file holds no PEM certificate"));
            }
            tls_config = tls_config.root_certs(RootCerts::from(certs));
        }
        if tls.insecure {
            tls_config = tls_config.disable_verification(true);
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT.min(bound)))
            .timeout_recv_response(Some(FIRST_BYTE_TIMEOUT.min(bound)))
            .timeout_per_read(Some(BODY_STALL_TIMEOUT.min(bound)))
            .max_idle_connections(4 * CONNECTIONS_PER_HOST)
            .max_idle_connections_per_host(CONNECTIONS_PER_HOST)
            // Redirects: a few, and credentials never cross to another host
            // (ureq's default RedirectAuthHeaders::Never).
            .max_redirects(5)
            .user_agent(concat!("snapmount/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls_config.build())
            .build();
        Ok(Http { agent: config.into() })
    }

    /// A `HEAD`: the object's size, version and times, and whether the
    /// server says it serves ranges (`Accept-Ranges: bytes`).
    pub fn head(
        &self,
        url: &str,
        headers: &[(String, String)],
        follow_redirects: bool,
    ) -> std::result::Result<(Answer, bool), Failure> {
        let resp = call(self.agent.head(url), headers, follow_redirects)?;
        let redirected = redirected(url, &resp);
        let status = resp.status().as_u16();
        let head = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        match status {
            200 => {}
            429 | 500..=599 => {
                let after = head("retry-after").and_then(|v| parse_retry_after(&v));
                return Err(Failure::Transient { why: format!("the server answered {status}"), after });
            }
            // HEAD is not always allowed (presigned URLs, some proxies): a
            // GET is asked instead.
            other => return Err(Failure::Fatal(format!("HEAD answered {other}"))),
        }
        // A Content-Range, where a server sends one, says the whole size
        // (hexz serve's Content-Length stops at 32 MiB, its range does not).
        let total = head("content-range")
            .and_then(|v| parse_content_range(&v))
            .map(|(_, total)| total)
            .or_else(|| head("content-length").and_then(|v| v.parse::<u64>().ok()));
        let ranges =
            head("accept-ranges").is_some_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes")));
        let answer = Answer {
            total: total.unwrap_or(0),
            etag: head("etag"),
            modified: head("last-modified").and_then(|t| httpdate::parse_http_date(&t).ok()),
            filled: 0,
            redirected,
        };
        Ok((answer, ranges && total.is_some()))
    }

    /// One `GET` of `buf.len()` bytes at `start`, into `buf`. `headers` are
    /// sent as they are (a signature, `If-Match`); `follow_redirects` is off
    /// for signed requests (a signature is for one host).
    pub fn get_range(
        &self,
        url: &str,
        headers: &[(String, String)],
        start: u64,
        buf: &mut [u8],
        follow_redirects: bool,
    ) -> std::result::Result<Answer, Failure> {
        let end = start + buf.len() as u64 - 1;
        let req = self.agent.get(url).header("Range", format!("bytes={start}-{end}"));
        let mut resp = call(req, headers, follow_redirects)?;
        let redirected = redirected(url, &resp);
        let status = resp.status().as_u16();
        let head = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = head("etag");
        let modified = head("last-modified").and_then(|t| httpdate::parse_http_date(&t).ok());
        let range = head("content-range");
        let length = head("content-length").and_then(|v| v.parse::<u64>().ok());
        let (first, last, total) = match status {
            206 => match range.as_deref().and_then(parse_content_range) {
                Some((Some((a, b)), total)) if a == start && b <= end && b < total => (a, b, total),
                _ => {
                    return Err(Failure::Fatal(format!(
                        "the server answered a request for bytes {start}-{end} with Content-Range {:?}",
                        range.unwrap_or_default()
                    )))
                }
            },
            // A whole object in answer to a range that starts at 0 and
            // covers it (some servers do that), or a Content-Range that
            // says what the body is.
            200 => match (range.as_deref().and_then(parse_content_range), length) {
                (Some((Some((a, b)), total)), _) if a == start && b <= end && b < total => (a, b, total),
                (None, Some(len)) if start == 0 && len <= buf.len() as u64 => (0, len.saturating_sub(1), len),
                _ => {
                    return Err(Failure::Fatal(
                        "the server ignores Range requests (it answered 200 with the whole object); \
                         snapmount reads remote images only from servers that support them"
                            .into(),
                    ))
                }
            },
            // Asked past the end: the answer still says where it is.
            416 => match range.as_deref().and_then(parse_content_range) {
                Some((None, total)) => {
                    return Ok(Answer { total, etag, modified, filled: 0, redirected });
                }
                _ => return Err(Failure::Fatal(format!("the server refused the range {start}-{end} (416)"))),
            },
            _ => return Err(refusal(status, &mut resp)),
        };
        if first == 0 && last == 0 && total == 0 {
            return Ok(Answer { total, etag, modified, filled: 0, redirected });
        }
        let filled = (last - first + 1) as usize;
        let mut reader = resp.body_mut().as_reader();
        read_full(&mut reader, &mut buf[..filled])
            .map_err(|e| Failure::Transient { why: format!("the body was cut short: {e}"), after: None })?;
        // ureq keeps a connection for the next request only once a read
        // has seen the body end: one more (empty) read, or every GET would
        // open a new connection (and, over HTTPS, a new TLS session).
        let _ = reader.read(&mut [0u8; 1]);
        Ok(Answer { total, etag, modified, filled, redirected })
    }

    /// A whole small document (an S3 listing page): at most `limit` bytes.
    pub fn get_document(
        &self,
        url: &str,
        headers: &[(String, String)],
        limit: u64,
    ) -> std::result::Result<Vec<u8>, Failure> {
        let mut resp = call(self.agent.get(url), headers, false)?;
        match resp.status().as_u16() {
            200 => resp
                .body_mut()
                .with_config()
                .limit(limit)
                .read_to_vec()
                .map_err(|e| Failure::Transient { why: format!("the listing could not be read: {e}"), after: None }),
            status => Err(refusal(status, &mut resp)),
        }
    }
}

/// Sends `req` with `headers`; without `follow_redirects`, a redirect is
/// the answer (a signature is for one host).
fn call(
    mut req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    headers: &[(String, String)],
    follow_redirects: bool,
) -> std::result::Result<ureq::http::Response<ureq::Body>, Failure> {
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if !follow_redirects {
        req = req.config().max_redirects(0).build();
    }
    req.call().map_err(transport_failure)
}

/// Why an answer other than the data is no data: a changed object (412),
/// worth a retry (429, 5xx, with the server's Retry-After), or not.
fn refusal(status: u16, resp: &mut ureq::http::Response<ureq::Body>) -> Failure {
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let after = header("retry-after").and_then(|v| parse_retry_after(&v));
    let location = header("location").unwrap_or_default();
    match status {
        412 => Failure::Changed("object changed on the server since it was opened".into()),
        429 | 500..=599 => Failure::Transient { why: format!("the server answered {status}{}", s3_code(resp)), after },
        301 | 302 | 303 | 307 | 308 => Failure::Fatal(format!(
            "the server redirected ({status}) to {location}; signed requests are not redirected \
             (use the right endpoint or region)"
        )),
        401 | 403 => Failure::Fatal(format!("access denied ({status}{})", s3_code(resp))),
        404 => Failure::Fatal(format!("not found (404{})", s3_code(resp))),
        other => Failure::Fatal(format!("the server answered {other}{}", s3_code(resp))),
    }
}

/// A failed request that never got an answer.
fn transport_failure(e: ureq::Error) -> Failure {
    // A TLS handshake that fails (an unknown issuer, a certificate for
    // another name) reaches us as an I/O error: asking again cannot help.
    if let ureq::Error::Io(io) = &e {
        if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            return Failure::Fatal(format!("TLS: {tls} (--ca-file trusts another root; --insecure checks none)"));
        }
    }
    match e {
        ureq::Error::BadUri(_) | ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::TooManyRedirects => {
            Failure::Fatal(format!("TLS: {e} (--ca-file trusts another root; --insecure checks none)"))
        }
        ureq::Error::Pem(_) | ureq::Error::InvalidProxyUrl | ureq::Error::RequireHttpsOnly(_) => {
            Failure::Fatal(e.to_string())
        }
        other => Failure::Transient { why: other.to_string(), after: None },
    }
}

/// The URL a response came from, when redirects led away from `asked`.
fn redirected(asked: &str, resp: &ureq::http::Response<ureq::Body>) -> Option<String> {
    use ureq::ResponseExt;
    let at = resp.get_uri().to_string();
    (at != asked).then_some(at)
}

fn read_full(r: &mut impl Read, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} bytes missing", buf.len()),
                ))
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `: Code` from an S3 error document (`<Error><Code>SlowDown</Code>`),
/// which says more than the status; empty for anything else.
fn s3_code(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let body = resp.body_mut().with_config().limit(64 << 10).read_to_vec().unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    match (text.find("<Code>"), text.find("</Code>")) {
        (Some(a), Some(b)) if a + 6 <= b && b - a < 100 => format!(": {}", &text[a + 6..b]),
        _ => String::new(),
    }
}

/// `bytes A-B/TOTAL` or `bytes */TOTAL`.
pub fn parse_content_range(v: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok()?;
    if range.trim() == "*" {
        return Some((None, total));
    }
    let (a, b) = range.trim().split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((Some((a, b)), total))
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// A one-line error for a remote failure, naming the URL.
pub fn error(url: &Path, why: &str) -> Error {
    Error::io(url, std::io::Error::other(why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-511/1024"), Some((Some((0, 511)), 1024)));
        assert_eq!(parse_content_range("bytes */1024"), Some((None, 1024)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
    }
}
