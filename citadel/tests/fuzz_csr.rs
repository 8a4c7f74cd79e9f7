//! CSRs fuzzed: any text, any bytes wrapped as PEM, and a valid CSR's DER
//! with bytes flipped, cut or added, are signed or refused as malformed,
//! never a panic. Whatever is signed carries the caller's identity and
//! nothing else, whatever the CSR asked for.

mod common;

use std::{sync::OnceLock, time::Duration};

use base64::Engine;
use citadel::{
    ca::{Ca, CaOptions, SignError},
    identity::Identity,
};
use proptest::prelude::*;
use testkit::fuzz;

fn ca() -> &'static Ca {
    static CA: OnceLock<(tempfile::TempDir, Ca)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&CaOptions {
            dir: dir.path().to_path_buf(),
            self_signed: true,
            key_algorithm: Default::default(),
            trust_domain: "cluster.local".into(),
            root_ttl: Duration::from_secs(86_400),
            default_ttl: Duration::from_secs(3_600),
            max_ttl: Duration::from_secs(86_400),
        })
        .unwrap();
        (dir, ca)
    })
    .1
}

fn caller() -> Identity {
    Identity::new("cluster.local", "shop", "reviews")
}

/// A CSR asking for the caller's identity: valid, to mutate.
fn valid_der() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let (_, pem) = common::csr(Some(&caller().to_string()));
        pem::parse(&pem).unwrap().into_contents()
    })
}

fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Signs `csr` and checks the outcome: a chain whose leaf names only the
/// caller, or a refusal that says the CSR was malformed or not the
/// caller's.
fn sign_and_check(csr: &str) -> Result<(), TestCaseError> {
    match ca().sign(csr, &caller(), None) {
        Ok(chain) => {
            let (uris, _) = common::inspect(&chain[0]);
            prop_assert_eq!(uris, vec![format!("URI({})", caller())]);
        }
        Err(SignError::MalformedCsr(_) | SignError::OtherIdentity { .. }) => {}
        Err(e) => prop_assert!(false, "unexpected refusal: {e}"),
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_text_is_signed_or_refused(text in any::<String>()) {
        sign_and_check(&text)?;
    }

    #[test]
    fn any_bytes_as_pem_are_signed_or_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        sign_and_check(&pem(&bytes))?;
    }

    #[test]
    fn a_mutated_csr_is_signed_for_the_caller_or_refused(edits in fuzz::edits()) {
        sign_and_check(&pem(&fuzz::mutated(valid_der(), &edits)))?;
    }
}

#[test]
fn the_unmutated_csr_is_signed() {
    let chain = ca().sign(&pem(valid_der()), &caller(), None).unwrap();
    assert_eq!(common::inspect(&chain[0]).0, [format!("URI({})", caller())]);
}
