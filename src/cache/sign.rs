//! Signed action entries. An object checks itself (its name is its
//! digest); an entry does not: anyone who can write to a bucket could point
//! a key at other outputs or change its counts. An entry pushed with a
//! signing key carries an ed25519 signature over its exact bytes (its key
//! material, so it cannot be replayed under another key, and every other
//! field), and a remote with trusted keys serves only entries one of them
//! signed.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// An entry's signature, stored in its header (beside the bytes it covers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// The name of the key that signed.
    pub signer: String,
    /// The ed25519 signature, base64.
    pub signature: String,
}

/// What a signature covers: the entry's exact bytes (its body), every field.
fn message(body: &[u8]) -> Vec<u8> {
    let mut m = b"prefgen-entry-v2\n".to_vec();
    m.extend_from_slice(body);
    m
}

/// A secret key with its name, as `prefgen cache keygen` writes it.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

/// A public key with its name: `NAME:BASE64`.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

impl SecretKey {
    /// A new key named `name`.
    pub fn generate(name: &str) -> Result<SecretKey> {
        if !valid_name(name) {
            bail!("{name:?}: a key name is letters, digits and - _ . @");
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow!("no randomness for a key: {e}"))?;
        Ok(SecretKey { name: name.into(), key: SigningKey::from_bytes(&seed) })
    }

    /// Reads a key file (`NAME:BASE64` of the 32-byte secret). Like ssh, it
    /// refuses a key that others may read or write: whoever can read it can
    /// sign as its owner.
    pub fn read(path: &Path) -> Result<SecretKey> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("cannot read signing key {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "signing key {path}: its mode is {:04o}, so others can read or change it; it is not used until \
                 only its owner can: `chmod 600 {path}`",
                mode & 0o7777,
                path = path.display()
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read signing key {}", path.display()))?;
        let bad = || anyhow!("{}: not a prefgen signing key (NAME:BASE64)", path.display());
        let (name, b64) = text.trim().split_once(':').ok_or_else(bad)?;
        let bytes: [u8; 32] = STANDARD.decode(b64).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        Ok(SecretKey { name: name.into(), key: SigningKey::from_bytes(&bytes) })
    }

    /// Writes the key file, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {} (an existing key is never overwritten)", path.display()))?;
        writeln!(f, "{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))?;
        Ok(())
    }

    /// `NAME:BASE64` of the public key, for `trusted_keys`.
    pub fn public(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.verifying_key().to_bytes()))
    }

    /// Signs an entry's body (its exact bytes).
    pub fn sign(&self, body: &[u8]) -> Signature {
        Signature { signer: self.name.clone(), signature: STANDARD.encode(self.key.sign(&message(body)).to_bytes()) }
    }
}

impl PublicKey {
    /// Parses `NAME:BASE64`.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let bad = || anyhow!("trusted key {text:?}: expected NAME:BASE64, as `prefgen cache keygen` prints it");
        let (name, b64) = text.trim().split_once(':').ok_or_else(bad)?;
        let bytes: [u8; 32] = STANDARD.decode(b64).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        Ok(PublicKey { name: name.into(), key: VerifyingKey::from_bytes(&bytes).map_err(|_| bad())? })
    }
}

/// Why an entry (its body and signature) is not trusted, if it is not:
/// unsigned, signed by a key not in `trusted`, or a signature that does not
/// cover these bytes.
pub fn distrust(signature: Option<&Signature>, body: &[u8], trusted: &[PublicKey]) -> Option<String> {
    let Some(sig) = signature else { return Some("it is unsigned".into()) };
    let Some(key) = trusted.iter().find(|k| k.name == sig.signer) else {
        return Some(format!("its signer {:?} is not a trusted key", sig.signer));
    };
    let bytes: Option<[u8; 64]> = STANDARD.decode(&sig.signature).ok().and_then(|b| b.try_into().ok());
    match bytes {
        Some(b) if key.key.verify(&message(body), &ed25519_dalek::Signature::from_bytes(&b)).is_ok() => None,
        _ => Some(format!("its signature by {:?} does not cover its contents", sig.signer)),
    }
}
