//! An S3-compatible bucket as a tier, through the Arrow project's
//! `object_store` crate (SigV4, conditional puts, multipart, retries with
//! backoff). Credentials, region and endpoint come from the standard AWS
//! environment and, where it lacks them, the profile files, as the AWS CLI
//! reads them; they never appear in a message.

use super::tier::{Blob, Bucket, Tier, Version};
use crate::config::RemoteSpec;
use crate::digest::Digest;
use anyhow::{Result, anyhow, bail};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion, WriteMultipart,
};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

/// Objects above this size go up in parts of this size, one uploading
/// while the next is read: an upload holds two parts in memory at most.
const PART: usize = 16 << 20;

/// Up to a part's worth of `src`.
fn read_part(src: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut part = Vec::new();
    (&mut *src).take(PART as u64).read_to_end(&mut part)?;
    Ok(part)
}

/// An object's body as it arrives, read a network chunk at a time.
struct Body<'a> {
    tier: &'a S3Tier,
    path: StorePath,
    stream: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.tier.runtime.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(io::Error::other(format!("{:#}", self.tier.err("read", &self.path, e)))),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

pub struct S3Tier {
    url: String,
    prefix: String,
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
}

/// One profile of an AWS INI file (`[name]` or `[profile name]`).
fn profile(path: Option<PathBuf>, name: &str) -> BTreeMap<String, String> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else { return BTreeMap::new() };
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.trim();
            inside = header == name || header.strip_prefix("profile ").map(str::trim) == Some(name);
        } else if inside && let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn aws_file(var: &str, default: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws").join(default)))
}

impl S3Tier {
    /// `s3://bucket/prefix`.
    pub fn open(spec: &RemoteSpec) -> Result<S3Tier> {
        let url = spec.url.trim_end_matches('/').to_string();
        let rest = url.strip_prefix("s3://").ok_or_else(|| anyhow!("{url}: not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{url}: no bucket (write s3://bucket/prefix)");
        }
        let name = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        let credentials = profile(aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &name);
        let config = profile(aws_file("AWS_CONFIG_FILE", "config"), &name);
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if env("AWS_ACCESS_KEY_ID").is_none()
            && let (Some(id), Some(secret)) =
                (credentials.get("aws_access_key_id"), credentials.get("aws_secret_access_key"))
        {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = credentials.get("aws_session_token") {
                b = b.with_token(token);
            }
        }
        let region = env("AWS_REGION").or(env("AWS_DEFAULT_REGION")).or(config.get("region").cloned());
        b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
        let endpoint = env("AWS_ENDPOINT_URL_S3").or(env("AWS_ENDPOINT_URL")).or(config.get("endpoint_url").cloned());
        if let Some(endpoint) = &endpoint {
            b = b.with_endpoint(endpoint);
        }
        let timeout = Duration::from_secs(spec.timeout_secs.max(1));
        let client = ClientOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout.min(Duration::from_secs(5)))
            .with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
        b = b.with_client_options(client).with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: spec.retries,
            retry_timeout: timeout * (spec.retries as u32 + 1),
        });
        let store = b.build().map_err(|e| anyhow!("{url}: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| anyhow!("{url}: cannot start the S3 client: {e}"))?;
        Ok(S3Tier { url: spec.shown(), prefix: prefix.trim_matches('/').to_string(), store, runtime })
    }

    fn path(&self, bucket: Bucket, name: &Digest) -> StorePath {
        let p = bucket.path(name);
        StorePath::from(if self.prefix.is_empty() { p } else { format!("{}/{p}", self.prefix) })
    }

    fn err(&self, what: &str, path: &StorePath, e: object_store::Error) -> anyhow::Error {
        anyhow!("{}: cannot {what} {path}: {}", self.url, crate::redact::redact(&reason(&e.to_string())))
    }
}

/// An S3 error in one line: the service's own `<Code>` and `<Message>`
/// (`NoSuchBucket: The specified bucket does not exist`) when its XML body
/// is quoted, otherwise the client's text.
fn reason(text: &str) -> String {
    let tag = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(&text[start..end])
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => text.replace('\n', " "),
    }
}

impl Tier for S3Tier {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get(&self, bucket: Bucket, name: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.path(bucket, name);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.err("read", &path, e))?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", &path, e)),
            }
        })
    }

    fn open(&self, bucket: Bucket, name: &Digest) -> Result<Option<Box<dyn Read + '_>>> {
        let path = self.path(bucket, name);
        match self.runtime.block_on(self.store.get(&path)) {
            Ok(r) => Ok(Some(Box::new(Body { tier: self, path, stream: r.into_stream(), chunk: bytes::Bytes::new() }))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read", &path, e)),
        }
    }

    fn size(&self, bucket: Bucket, name: &Digest) -> Result<Option<u64>> {
        let path = self.path(bucket, name);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read", &path, e)),
        }
    }

    fn put_reader(&self, bucket: Bucket, name: &Digest, src: &mut dyn Read) -> Result<u64> {
        let path = self.path(bucket, name);
        let unreadable = |e: io::Error| anyhow!("{}: cannot write {path}: {e}", self.url);
        let first = read_part(src).map_err(unreadable)?;
        let mut stored = first.len() as u64;
        if first.len() < PART {
            self.runtime
                .block_on(self.store.put(&path, PutPayload::from(first)))
                .map_err(|e| self.err("write", &path, e))?;
            return Ok(stored);
        }
        self.runtime.block_on(async {
            let upload = self.store.put_multipart(&path).await.map_err(|e| self.err("write", &path, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            w.put(first.into());
            loop {
                // Reads the next part while the last one uploads.
                let part = match read_part(src) {
                    Ok(part) => part,
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(unreadable(e));
                    }
                };
                if part.is_empty() {
                    break;
                }
                if let Err(e) = w.wait_for_capacity(1).await {
                    let _ = w.abort().await;
                    return Err(self.err("write", &path, e));
                }
                stored += part.len() as u64;
                w.put(part.into());
            }
            w.finish().await.map_err(|e| self.err("write", &path, e))
        })?;
        Ok(stored)
    }

    fn is_empty(&self) -> Result<bool> {
        let prefix = (!self.prefix.is_empty()).then(|| StorePath::from(self.prefix.as_str()));
        let first = self.runtime.block_on(async { self.store.list(prefix.as_ref()).next().await });
        match first {
            None => Ok(true),
            Some(Ok(_)) => Ok(false),
            Some(Err(e)) => Err(self.err("list", prefix.as_ref().unwrap_or(&StorePath::from("")), e)),
        }
    }

    fn create(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<bool> {
        let path = self.path(bucket, name);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(bytes));
        match self.runtime.block_on(self.store.put_opts(&path, payload, opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("write", &path, e)),
        }
    }

    fn remove(&self, bucket: Bucket, name: &Digest) -> Result<()> {
        let path = self.path(bucket, name);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("remove", &path, e)),
        }
    }

    fn list(&self, bucket: Bucket) -> Result<Vec<Blob>> {
        let dir = StorePath::from(if self.prefix.is_empty() {
            bucket.dir_name().to_string()
        } else {
            format!("{}/{}", self.prefix, bucket.dir_name())
        });
        let metas: Vec<_> = self.runtime.block_on(self.store.list(Some(&dir)).collect());
        let mut out = Vec::new();
        for meta in metas {
            let meta = meta.map_err(|e| self.err("list", &dir, e))?;
            if let Some(name) = meta.location.filename().and_then(|n| n.parse::<Digest>().ok()) {
                let modified =
                    std::time::UNIX_EPOCH + Duration::from_millis(meta.last_modified.timestamp_millis().max(0) as u64);
                out.push(Blob { name, size: meta.size, modified });
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_record(&self, bucket: Bucket, name: &Digest) -> Result<Option<(Vec<u8>, Version)>> {
        let path = self.path(bucket, name);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => {
                    let tag = r.meta.e_tag.clone().ok_or_else(|| anyhow!("{}: {path} has no ETag", self.url))?;
                    let bytes = r.bytes().await.map_err(|e| self.err("read", &path, e))?;
                    Ok(Some((bytes.to_vec(), Version(tag))))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", &path, e)),
            }
        })
    }

    fn swap_record(
        &self,
        bucket: Bucket,
        name: &Digest,
        expected: Option<&Version>,
        bytes: &[u8],
    ) -> Result<Option<Version>> {
        let path = self.path(bucket, name);
        // If-None-Match: * to create, If-Match: the ETag read to update.
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion { e_tag: Some(v.0.clone()), version: None }),
        };
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(bytes));
        match self.runtime.block_on(self.store.put_opts(&path, payload, PutOptions { mode, ..Default::default() })) {
            Ok(r) => {
                Ok(Some(Version(r.e_tag.ok_or_else(|| anyhow!("{}: {path} was written without an ETag", self.url))?)))
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. },
            ) => Ok(None),
            Err(e) => Err(self.err("update", &path, e)),
        }
    }
}
