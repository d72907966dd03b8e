//! What prefgen prints never holds a credential: every URL's user and
//! password (`s3://user:pw@bucket`, an `AWS_ENDPOINT_URL` of
//! `http://user:pw@host`, a `generate.server` URL) are removed from a text
//! before it is shown. The error printer in `main`, the warnings that quote
//! another library's error, and every URL kept for messages (a remote's, a
//! server's) go through [`redact`].

/// `text` with the user and password of every `scheme://user:pw@host` in it
/// removed (a transport error quotes the URL it failed on, anywhere in its
/// message).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme + 3);
        out.push_str(head);
        // The authority ends at the path, the query, the fragment, or where
        // the URL ends in the text: a character no user or password holds
        // unencoded (a space, a double quote, an angle bracket).
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '`' | '<' | '>') || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = match tail[..end].rfind('@') {
            Some(at) => &tail[at + 1..],
            None => tail,
        };
    }
    out.push_str(rest);
    out
}

/// Whether `url` names a user or a password.
pub fn has_credentials(url: &str) -> bool {
    redact(url) != url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_passwords_are_removed_from_every_url() {
        assert_eq!(redact("https://me:secret@host:8000/v1"), "https://host:8000/v1");
        assert_eq!(redact("http://host:8000/v1"), "http://host:8000/v1");
        assert_eq!(
            redact("http://u:p@h:1/v1/models: Connection refused; see https://x@y/z"),
            "http://h:1/v1/models: Connection refused; see https://y/z"
        );
        assert_eq!(redact("remote s3://user:pw@bucket/p failed"), "remote s3://bucket/p failed");
        assert_eq!(redact("\"http://a:b-${X}@h/v1\" names ${X}"), "\"http://h/v1\" names ${X}");
        assert_eq!(redact("url (http://a:p@ss@h:9)"), "url (http://h:9)");
        assert_eq!(redact("http://a:b@h"), "http://h");
        assert_eq!(redact("(http://a:p(w)'d@h)"), "(http://h)");
        assert_eq!(redact("file:///shared/cache and me@example.org"), "file:///shared/cache and me@example.org");
        assert!(has_credentials("s3://k@bucket/p") && !has_credentials("s3://bucket/p"));
    }
}
