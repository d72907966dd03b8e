//! Action keys and entries, and how a tier stores an entry: a header line
//! with the BLAKE3 digest of the entry's exact bytes (and, pushed with a
//! signing key, a signature of them), then those bytes. So every field
//! (key material, outputs, counts, engines, parts) is covered, and a changed
//! byte is caught wherever the entry is read.

use super::sign::{SecretKey, Signature};
use crate::digest::Digest;
use crate::stages::Counts;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Everything that determines a node's output; its digest is the action key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyMaterial {
    /// The stage's name.
    pub stage: String,
    /// Bumped when a stage's code changes what it produces.
    pub version: u32,
    /// Every parameter that changes the output, by recipe key (`filter.drop_identical`).
    pub params: BTreeMap<String, Value>,
    /// Input name -> digest: upstream artifacts, imported files, model and
    /// dataset identities.
    pub inputs: BTreeMap<String, Digest>,
}

impl KeyMaterial {
    pub fn key(&self) -> Digest {
        Digest::of_json(self)
    }

    /// The recipe keys and inputs that differ from `old`, for `plan`'s reasons.
    pub fn changes_since(&self, old: &KeyMaterial) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.params {
            match old.params.get(k) {
                Some(o) if o == v => {}
                Some(o) => out.push(format!("{k} changed ({o} -> {v})")),
                None => out.push(format!("{k} is new ({v})")),
            }
        }
        for k in old.params.keys().filter(|k| !self.params.contains_key(*k)) {
            out.push(format!("{k} was removed"));
        }
        for (k, v) in &self.inputs {
            match old.inputs.get(k) {
                Some(o) if o == v => {}
                Some(_) => out.push(format!("input {k} changed")),
                None => out.push(format!("input {k} is new")),
            }
        }
        for k in old.inputs.keys().filter(|k| !self.inputs.contains_key(*k)) {
            out.push(format!("input {k} was removed"));
        }
        if out.is_empty() && (self.stage != old.stage || self.version != old.version) {
            out.push(format!("stage {} version changed ({} -> {})", self.stage, old.version, self.version));
        }
        out
    }
}

/// One file a node produced: where it goes under `export.dir`, and its object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

/// What the action cache stores under a key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionEntry {
    #[serde(flatten)]
    pub material: KeyMaterial,
    /// The node that built it (for people reading the cache).
    pub node: String,
    pub outputs: Vec<OutputFile>,
    /// Counts the stage reported (rows dropped, ties, ...), for the card.
    pub counts: Counts,
    /// The engines that computed it (device, dtype, kernels, prefgen
    /// version), for sampled and scored outputs. Not in the key: see the
    /// book's "Engines" (docs/src/cache.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<String>,
    /// The shard entries it was assembled from, so `cache gc` keeps them
    /// while it is reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Digest>,
}

/// The first line of a stored entry.
#[derive(Serialize, Deserialize)]
struct Header {
    /// The digest of the body: the entry's JSON, byte for byte.
    blake3: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<Signature>,
}

/// An entry read back from a tier, its digest and key checked.
#[derive(Debug)]
pub struct Stored {
    pub entry: ActionEntry,
    pub signature: Option<Signature>,
    /// The entry's exact bytes, which the signature must cover.
    pub body: Vec<u8>,
}

impl Stored {
    /// Reads the blob a tier holds under `key`, or says why it is damaged:
    /// its body changed since its digest was taken, it does not parse, or
    /// its key material does not hash to `key`.
    pub fn open(bytes: &[u8], key: &Digest) -> std::result::Result<Stored, String> {
        let Some(eol) = bytes.iter().position(|&b| b == b'\n') else { return Err("it has no header line".into()) };
        let header: Header =
            serde_json::from_slice(&bytes[..eol]).map_err(|e| format!("its header does not parse ({e})"))?;
        let body = &bytes[eol + 1..];
        if Digest::of(body) != header.blake3 {
            return Err("its bytes do not match their digest".into());
        }
        let entry: ActionEntry = serde_json::from_slice(body).map_err(|e| format!("it does not parse ({e})"))?;
        if entry.key() != *key {
            return Err("its key material does not hash to its name".into());
        }
        Ok(Stored { entry, signature: header.signature, body: body.to_vec() })
    }
}

impl ActionEntry {
    pub fn key(&self) -> Digest {
        self.material.key()
    }

    /// The entry as a tier stores it (see the module's doc), signed by
    /// `signer` when given.
    pub fn seal(&self, signer: Option<&SecretKey>) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("entries serialise");
        let header = Header { blake3: Digest::of(&body), signature: signer.map(|s| s.sign(&body)) };
        let mut bytes = serde_json::to_vec(&header).expect("headers serialise");
        bytes.push(b'\n');
        bytes.extend_from_slice(&body);
        bytes
    }

    /// The output named `path`.
    pub fn output(&self, path: &str) -> Option<&OutputFile> {
        self.outputs.iter().find(|o| o.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ActionEntry {
        let material =
            KeyMaterial { stage: "binarize".into(), version: 1, params: BTreeMap::new(), inputs: BTreeMap::new() };
        let counts = Counts { ties: Some(3), ..Counts::default() };
        ActionEntry {
            material,
            node: "binarize[train]".into(),
            outputs: vec![],
            counts,
            engines: vec![],
            parts: vec![],
        }
    }

    #[test]
    fn every_byte_of_a_stored_entry_is_checked() {
        let e = entry();
        let bytes = e.seal(None);
        let stored = Stored::open(&bytes, &e.key()).unwrap();
        assert_eq!(stored.entry.counts.ties, Some(3));
        assert!(stored.signature.is_none());
        let text = String::from_utf8(bytes.clone()).unwrap();
        let flipped = text.replace("\"ties\": 3", "\"ties\": 8");
        assert_ne!(flipped, text);
        assert!(Stored::open(flipped.as_bytes(), &e.key()).unwrap_err().contains("do not match their digest"));
        assert!(Stored::open(&bytes, &Digest::of(b"another key")).unwrap_err().contains("its name"));
        assert!(Stored::open(b"{}", &e.key()).is_err());
    }

    #[test]
    fn a_signature_covers_every_field() {
        let key = SecretKey::generate("alice").unwrap();
        let trusted = [super::super::sign::PublicKey::parse(&key.public()).unwrap()];
        let e = entry();
        let stored = Stored::open(&e.seal(Some(&key)), &e.key()).unwrap();
        assert_eq!(super::super::sign::distrust(stored.signature.as_ref(), &stored.body, &trusted), None);
        // The same signature over an entry whose counts differ.
        let mut edited = e.clone();
        edited.counts.ties = Some(999);
        let body = Stored::open(&edited.seal(None), &e.key()).unwrap().body;
        let why = super::super::sign::distrust(stored.signature.as_ref(), &body, &trusted).unwrap();
        assert!(why.contains("does not cover its contents"), "{why}");
    }
}
