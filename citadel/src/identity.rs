//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses a SPIFFE URI of Istio's form.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        match rest.split('/').collect::<Vec<_>>()[..] {
            [domain, "ns", ns, "sa", sa] if [domain, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(Self::new(domain, ns, sa))
            }
            _ => Err(format!(
                "{uri:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_forms() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/reviews").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "reviews"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
        for bad in [
            "https://cluster.local/ns/shop/sa/reviews",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/reviews",
            "spiffe://cluster.local/sa/reviews/ns/shop",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
    }
}
