//! S3: where a bucket's objects are reached, the credentials (AWS's own
//! provider chain), SigV4 signatures (AWS's own signer), and listings.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use parking_lot::Mutex;

/// How S3 is reached: endpoint, region, credentials.
pub struct S3 {
    /// A custom endpoint (`--s3-endpoint`, `AWS_ENDPOINT_URL_S3`,
    /// `AWS_ENDPOINT_URL`, a profile's `endpoint_url`): path-style
    /// addressing. `None`: AWS itself, virtual-hosted.
    endpoint: Option<String>,
    region: String,
    provider: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    /// The runtime AWS's credential providers run on (they are async; the
    /// read path is not). Used only when credentials are (re)loaded.
    runtime: tokio::runtime::Runtime,
    /// The last credentials (or `None`: anonymous) and when to ask again.
    current: Mutex<Option<(Option<Credentials>, SystemTime)>>,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        write!(f, "S3 {{ endpoint: {:?}, region: {} }}", self.endpoint, self.region)
    }
}

/// Anonymous access (no credentials found) is looked up again after this.
const ANONYMOUS_FOR: Duration = Duration::from_secs(300);
/// Credentials that expire are renewed this long before they do.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

impl S3 {
    /// Loads the AWS configuration (environment, shared files, profile)
    /// once; `endpoint` is `--s3-endpoint`.
    pub fn new(endpoint: Option<&str>) -> Result<S3, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime for AWS credentials: {e}"))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config =
            runtime.block_on(aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).load());
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok().filter(|s| !s.is_empty()))
            .or_else(|| config.endpoint_url().map(str::to_string))
            .map(|e| e.trim_end_matches('/').to_string());
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("S3 endpoint '{e}' must be an http:// or https:// URL"));
            }
        }
        let region = config.region().map(|r| r.to_string()).unwrap_or_else(|| "us-east-1".to_string());
        Ok(S3 { endpoint, region, provider: config.credentials_provider(), runtime, current: Mutex::new(None) })
    }

    /// The HTTP(S) URL of `key` in `bucket` (an empty key: the bucket).
    pub fn object_url(&self, bucket: &str, key: &str) -> String {
        let key = uri_encode(key, false);
        match &self.endpoint {
            Some(e) => format!("{e}/{bucket}/{key}"),
            // Virtual-hosted, unless the bucket name cannot be a host name.
            None if !bucket.contains('.') => format!("https://{bucket}.s3.{}.amazonaws.com/{key}", self.region),
            None => format!("https://s3.{}.amazonaws.com/{bucket}/{key}", self.region),
        }
    }

    /// A ListObjectsV2 page of `prefix` (direct children only, as a local
    /// directory source takes them).
    pub fn list_url(&self, bucket: &str, prefix: &str, token: Option<&str>) -> String {
        let mut q =
            vec![("delimiter", "/".to_string()), ("list-type", "2".to_string()), ("prefix", uri_encode(prefix, true))];
        if let Some(t) = token {
            q.push(("continuation-token", uri_encode(t, true)));
        }
        let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}?{}", self.object_url(bucket, "").trim_end_matches('/'), query.join("&"))
    }

    /// The headers that sign a `method` request of `url` now (none when
    /// anonymous).
    pub fn sign(&self, method: &str, url: &str) -> Result<Vec<(String, String)>, String> {
        let Some(creds) = self.credentials()? else {
            return Ok(Vec::new());
        };
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let identity = creds.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| format!("cannot sign the request: {e}"))?
            .into();
        let request = SignableRequest::new(method, url, std::iter::empty(), SignableBody::UnsignedPayload)
            .map_err(|e| format!("cannot sign the request: {e}"))?;
        let (instructions, _) =
            sign(request, &params).map_err(|e| format!("cannot sign the request: {e}"))?.into_parts();
        Ok(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// The credentials to sign with, or `None` for anonymous access when the
    /// chain found none. Loaded on first use and renewed before they
    /// expire.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        let mut current = self.current.lock();
        if let Some((creds, until)) = &*current {
            if SystemTime::now() < *until {
                return Ok(creds.clone());
            }
        }
        let Some(provider) = &self.provider else {
            *current = Some((None, SystemTime::now() + ANONYMOUS_FOR));
            return Ok(None);
        };
        let loaded = match self.runtime.block_on(provider.provide_credentials()) {
            Ok(c) => {
                let until = c
                    .expiry()
                    .and_then(|e| e.checked_sub(RENEW_BEFORE))
                    .unwrap_or(SystemTime::now() + Duration::from_secs(3600));
                (Some(c), until)
            }
            Err(aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)) => {
                (None, SystemTime::now() + ANONYMOUS_FOR)
            }
            Err(e) => return Err(format!("cannot load AWS credentials: {e}")),
        };
        *current = Some(loaded.clone());
        Ok(loaded.0)
    }
}

/// The keys and sub-prefixes of one listing page, and the token of the
/// next page.
pub fn parse_listing(xml: &[u8]) -> Result<(Vec<String>, Option<String>), String> {
    let text = std::str::from_utf8(xml).map_err(|_| "the listing is not UTF-8".to_string())?;
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("the listing is not XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListBucketResult" {
        return Err(format!("the listing is a <{}>, not a ListBucketResult", root.tag_name().name()));
    }
    let child_text = |node: roxmltree::Node, name: &str| {
        node.children().find(|c| c.tag_name().name() == name).and_then(|c| c.text()).map(str::to_string)
    };
    let keys =
        root.children().filter(|c| c.tag_name().name() == "Contents").filter_map(|c| child_text(c, "Key")).collect();
    let truncated = child_text(root, "IsTruncated").is_some_and(|t| t == "true");
    let next = if truncated { child_text(root, "NextContinuationToken") } else { None };
    if truncated && next.is_none() {
        return Err("the listing is truncated but gives no continuation token".into());
    }
    Ok((keys, next))
}

/// S3's URI encoding: every byte but the unreserved ones as %XX; `/` kept
/// in keys, encoded in query values.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (b == b'/' && !encode_slash) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_once() {
        assert_eq!(uri_encode("vm/disk 1+x.qcow2", false), "vm/disk%201%2Bx.qcow2");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
    }

    #[test]
    fn listings() {
        let xml = br#"<?xml version="1.0"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <Name>b</Name><IsTruncated>true</IsTruncated><NextContinuationToken>t1</NextContinuationToken>
            <Contents><Key>vm/a.qcow2</Key></Contents><Contents><Key>vm/b c</Key></Contents>
            <CommonPrefixes><Prefix>vm/sub/</Prefix></CommonPrefixes></ListBucketResult>"#;
        let (keys, next) = parse_listing(xml).unwrap();
        assert_eq!(keys, ["vm/a.qcow2", "vm/b c"]);
        assert_eq!(next.as_deref(), Some("t1"));
        assert!(parse_listing(b"<Error><Code>AccessDenied</Code></Error>").is_err());
    }
}
