//! Where the cache is, said once: `prefgen.toml` in the directory prefgen
//! runs in (or `--config FILE`), then `PREFGEN_CACHE` / `--cache` for the
//! local folder and `PREFGEN_REMOTE` / `--remote` for one more read-write
//! remote; `--no-remote` ignores every remote.
//!
//! ```toml
//! [cache]
//! dir = "/scratch/prefgen-cache"
//!
//! [[remotes]]
//! url = "s3://team-bucket/prefgen"     # or a folder: /shared/prefgen, file:///shared/prefgen
//! write = true
//! trusted_keys = ["alice:3q2+7w..."]   # serve only entries these keys signed
//! signing_key = "~/.config/prefgen/alice.key"
//! ```

use crate::redact::{has_credentials, redact};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The file read from the directory prefgen runs in.
pub const FILE: &str = "prefgen.toml";

/// `prefgen.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cache: CacheSection,
    /// Shared caches, looked up in this order after the local one.
    #[serde(default)]
    pub remotes: Vec<RemoteSpec>,
}

/// `[cache]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// The local cache folder (default `./cache`).
    pub dir: Option<PathBuf>,
}

/// One `[[remotes]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// `s3://bucket/prefix`, a folder, or `file:///folder`.
    pub url: String,
    /// Whether prefgen may write to it (`cache push`, `run --push`).
    #[serde(default)]
    pub write: bool,
    /// `NAME:BASE64` public keys; when set, only entries one of them signed
    /// are served. Unset: every writer of the remote is trusted.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// A secret key file (`prefgen cache keygen`) that signs the entries
    /// pushed to it.
    pub signing_key: Option<PathBuf>,
    /// Seconds one request may take before it is retried.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries of a failed request (timeouts, 5xx, 429), with backoff.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

fn default_timeout() -> u64 {
    30
}
fn default_retries() -> usize {
    4
}

impl RemoteSpec {
    /// The URL as messages show it: never with a user or password.
    pub fn shown(&self) -> String {
        redact(self.url.trim_end_matches('/'))
    }

    /// A read-write remote given by `--remote` or `PREFGEN_REMOTE`.
    pub fn read_write(url: &str) -> RemoteSpec {
        RemoteSpec {
            url: url.to_string(),
            write: true,
            trusted_keys: vec![],
            signing_key: None,
            timeout_secs: default_timeout(),
            retries: default_retries(),
        }
    }
}

/// Where this invocation's caches are.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cache_dir: PathBuf,
    pub remotes: Vec<RemoteSpec>,
}

/// What the command line says about the cache.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    /// `--cache` or `PREFGEN_CACHE`.
    pub cache: Option<PathBuf>,
    /// `--remote` or `PREFGEN_REMOTE`.
    pub remote: Option<String>,
    pub no_remote: bool,
}

impl Settings {
    /// The settings: flags over the environment over `prefgen.toml` over defaults.
    pub fn resolve(flags: &Flags) -> Result<Settings> {
        let config = match &flags.config {
            Some(path) => Config::read(path)?,
            None if Path::new(FILE).is_file() => Config::read(Path::new(FILE))?,
            None => Config::default(),
        };
        let cache_dir = flags
            .cache
            .clone()
            .or(config.cache.dir.map(|d| expand_home(&d)))
            .unwrap_or_else(|| PathBuf::from(crate::cache::DEFAULT_ROOT));
        let mut remotes = config.remotes;
        if let Some(url) = &flags.remote {
            remotes.push(RemoteSpec::read_write(url));
        }
        if flags.no_remote {
            remotes.clear();
        }
        for r in &mut remotes {
            // A password in the URL would be printed, passed on to job
            // scripts and logs, and would not reach S3 anyway.
            if has_credentials(&r.url) {
                bail!(
                    "remote {}: a user or password in a remote's URL is not read (and would be shown): give S3 \
                     credentials through the AWS environment or profile files",
                    r.shown()
                );
            }
            r.signing_key = r.signing_key.as_deref().map(expand_home);
        }
        Ok(Settings { cache_dir, remotes })
    }
}

impl Config {
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| format!(":{}", text[..s.start].matches('\n').count() + 1)).unwrap_or_default();
            anyhow::anyhow!("{}{at}: {}", path.display(), e.message().trim())
        })?;
        for r in &config.remotes {
            if r.url.trim().is_empty() {
                bail!("{}: a remote has an empty url", path.display());
            }
        }
        Ok(config)
    }
}

/// `~/x` as the home folder's `x`.
pub fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_url_with_a_password_is_refused_without_showing_it() {
        let flags =
            |url: &str| Flags { remote: Some(url.into()), config: Some("/dev/null".into()), ..Flags::default() };
        let err = Settings::resolve(&flags("s3://user:hunter2@team/prefgen")).unwrap_err().to_string();
        assert!(err.contains("s3://team/prefgen") && !err.contains("hunter2"), "{err}");
        let ok = Settings::resolve(&flags("s3://team/prefgen/")).unwrap();
        assert_eq!(ok.remotes[0].shown(), "s3://team/prefgen");
    }
}
