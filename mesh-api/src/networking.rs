//! Istio's networking rules that both Galley (which validates config) and
//! Pilot (which turns it into xDS) apply, so that the two cannot disagree.

use crate::pb::istio::networking::v1alpha3::HttpRetry;

/// How many times a route retries under `retries`: `Ok(None)` for
/// `attempts: 0`, which turns retries off (Pilot sends no retry policy,
/// as Istio's does); an error for a negative count. Istio 1.1's own
/// validation refused 0 while its Pilot honoured it; later Istio releases
/// accept it, and so does this mesh.
pub fn retry_attempts(retries: &HttpRetry) -> Result<Option<u32>, String> {
    match u32::try_from(retries.attempts) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(format!(
            "attempts {} must not be negative (0 turns retries off)",
            retries.attempts
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_attempts_turn_retries_off_and_negative_ones_are_refused() {
        let with = |attempts| HttpRetry {
            attempts,
            ..HttpRetry::default()
        };
        assert_eq!(retry_attempts(&with(3)), Ok(Some(3)));
        assert_eq!(retry_attempts(&with(0)), Ok(None));
        assert!(retry_attempts(&with(-1)).unwrap_err().contains("negative"));
    }
}
