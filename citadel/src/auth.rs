//! Who is asking for a certificate, by the bearer token it sends. In local
//! mode the operator gives each identity its own bootstrap token, in a file
//! of lines `<namespace>/<service-account> <token>`; in Kubernetes mode the
//! token is the workload's service account token, checked by the API
//! server.

use std::{collections::HashMap, path::Path};

use tonic::{Status, metadata::MetadataMap};

use crate::{identity::Identity, kube::TokenReviewer};

/// How bearer tokens are checked.
pub enum Tokens {
    Bootstrap(BootstrapTokens),
    Kube(Box<TokenReviewer>),
}

impl Tokens {
    /// The identity of the bearer token in `metadata`.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Identity, Status> {
        let token = bearer(metadata)?;
        match self {
            Self::Bootstrap(tokens) => tokens.authenticate(token),
            Self::Kube(reviewer) => reviewer.authenticate(token).await,
        }
    }
}

fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("no credential: send `authorization: Bearer <token>`")
    })?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))
}

/// Bootstrap tokens, kept as digests: the file's secrets are not held in
/// memory, and a lookup by digest does not compare secrets byte by byte.
#[derive(Default)]
pub struct BootstrapTokens {
    by_digest: HashMap<Vec<u8>, Identity>,
}

fn digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

impl BootstrapTokens {
    /// Reads `path`; an error names the file and line.
    pub fn load(path: &Path, trust_domain: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text, trust_domain).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
    }

    fn parse(text: &str, trust_domain: &str) -> Result<Self, String> {
        let mut tokens = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (ns, sa, token) = match fields[..] {
                [identity, token] => match identity.split_once('/') {
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                        (ns, sa, token)
                    }
                    _ => {
                        return Err(format!(
                            "{}: {identity:?} is not <namespace>/<service-account>",
                            n + 1
                        ));
                    }
                },
                _ => {
                    return Err(format!(
                        "{}: expected `<namespace>/<service-account> <token>`",
                        n + 1
                    ));
                }
            };
            let identity = Identity::new(trust_domain, ns, sa);
            if let Some(other) = tokens.by_digest.insert(digest(token), identity.clone()) {
                return Err(format!(
                    "{}: the token of {identity} is also {other}'s; each identity needs its own",
                    n + 1
                ));
            }
        }
        Ok(tokens)
    }

    /// The identity `token` was given to.
    fn authenticate(&self, token: &str) -> Result<Identity, Status> {
        self.by_digest
            .get(&digest(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[tokio::test]
    async fn tokens_map_to_their_identity() {
        let text = "# comment\nshop/reviews t1\n\nshop/ratings t2\n";
        let tokens = Tokens::Bootstrap(BootstrapTokens::parse(text, "td").unwrap());
        let id = tokens.authenticate(&header("t2")).await.unwrap();
        assert_eq!(id, Identity::new("td", "shop", "ratings"));
        let refused = tokens.authenticate(&header("t3")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let missing = tokens.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert!(
            missing.message().contains("Bearer"),
            "{}",
            missing.message()
        );
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line) in [
            ("shop/reviews t1\nreviews t2\n", "2:"),
            ("shop/reviews\n", "1:"),
            ("a/b t1\nc/d t1\n", "2:"),
        ] {
            let error = BootstrapTokens::parse(text, "td").err().unwrap();
            assert!(error.starts_with(line), "{text:?}: {error}");
        }
    }
}
