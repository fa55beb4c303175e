//! What the neighborhood's tests share.

use meshnode_protocol::Identity;
use proptest::test_runner::Config as ProptestConfig;

/// `default` cases, unless `PROPTEST_CASES` says how many.
pub(super) fn cases(default: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default;
    }
    config
}

/// `count` identities from the seeds 1, 2, 3, …, the same in every run.
pub(super) fn identities(count: usize) -> Vec<Identity> {
    (1..=count)
        .map(|seed| Identity::from_seed([u8::try_from(seed).expect("at most 255 seeds"); 32]))
        .collect()
}

/// The identity of seed `seed`, the same in every run.
pub(super) fn identity(seed: u8) -> Identity {
    Identity::from_seed([seed; 32])
}
