//! The request mix: which group each request asks about (uniform or Zipf over a fixed
//! set, or a fresh group every time) and which of the group's latest MsgSeqs. Bodies are
//! Tencent's request shape, built as bytes once per request before it is timed.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rand::RngExt;
use rand::rngs::SmallRng;
use rand::seq::index;

use crate::cli::{Distribution, MixSettings};

/// Group ids start with a fixed prefix: the simulator fails groups named `missing…` or
/// `invalid…`, which the mix must never hit.
const GROUP_PREFIX: &str = "loadgen-";

pub struct Mix {
    groups: Groups,
    per_request: usize,
    latest: usize,
}

/// How a request's group is drawn.
enum Groups {
    Uniform(usize),
    /// The cumulative distribution over groups 0..n, for inverse-transform sampling.
    Zipf(Vec<f64>),
    /// `<prefix><n>` for the next n, shared by every worker: no request asks for a group
    /// asked for before, so none is answered from cache or joins another's fetch.
    Fresh {
        prefix: String,
        next: AtomicU64,
    },
}

impl Mix {
    pub fn new(s: &MixSettings) -> Mix {
        let groups = match s.distribution {
            Distribution::Uniform => Groups::Uniform(s.groups),
            Distribution::Zipf => Groups::Zipf(zipf_cdf(s.groups, s.zipf_exponent)),
        };
        Mix { groups, per_request: s.seqs_per_request, latest: s.latest }
    }

    /// Every request for a group nobody asked for before, named `<prefix><n>`, with the
    /// MsgSeqs of `s` (its groups and distribution do not apply). The prefix must not
    /// start with `missing` or `invalid`, which the simulator fails.
    pub fn fresh(prefix: String, s: &MixSettings) -> Mix {
        Mix {
            groups: Groups::Fresh { prefix, next: AtomicU64::new(0) },
            per_request: s.seqs_per_request,
            latest: s.latest,
        }
    }

    /// The groups of a fixed set (0 for fresh groups: there is nothing to fill).
    pub fn group_count(&self) -> usize {
        match &self.groups {
            Groups::Uniform(n) => *n,
            Groups::Zipf(cdf) => cdf.len(),
            Groups::Fresh { .. } => 0,
        }
    }

    /// A request for a drawn group and `per_request` distinct MsgSeqs out of 1..=latest.
    pub fn next_body(&self, rng: &mut SmallRng) -> Bytes {
        let group = self.draw_group(rng);
        // `Settings::check` guarantees per_request <= latest, so `sample` cannot panic.
        let seqs = index::sample(rng, self.latest, self.per_request).into_iter().map(|i| i as u64 + 1);
        match group {
            Drawn::Numbered(group) => body(format_args!("{GROUP_PREFIX}{group}"), seqs),
            Drawn::Fresh(prefix, n) => body(format_args!("{prefix}{n}"), seqs),
        }
    }

    /// A request for all of `group`'s latest MsgSeqs (to fill the cache).
    pub fn fill_body(&self, group: usize) -> Bytes {
        body(format_args!("{GROUP_PREFIX}{group}"), 1..=self.latest as u64)
    }

    fn draw_group(&self, rng: &mut SmallRng) -> Drawn<'_> {
        match &self.groups {
            Groups::Uniform(n) => Drawn::Numbered(rng.random_range(0..*n)),
            Groups::Zipf(cdf) => {
                let u: f64 = rng.random();
                Drawn::Numbered(cdf.partition_point(|&c| c < u).min(cdf.len() - 1))
            }
            Groups::Fresh { prefix, next } => Drawn::Fresh(prefix, next.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

/// The group a request asks about.
enum Drawn<'a> {
    /// `loadgen-<n>`, of the fixed set.
    Numbered(usize),
    Fresh(&'a str, u64),
}

fn zipf_cdf(n: usize, exponent: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|rank| (rank as f64).powf(-exponent)).collect();
    let total: f64 = weights.iter().sum();
    let mut running = 0.0;
    weights
        .iter()
        .map(|w| {
            running += w / total;
            running
        })
        .collect()
}

/// `{"GroupId":"loadgen-7","MsgSeqList":[{"MsgSeq":3},…]}`; `group` is written as it is
/// (the mix's ids need no JSON escaping).
pub fn body(group: impl Display, seqs: impl Iterator<Item = u64>) -> Bytes {
    let mut json = String::with_capacity(64 + 16 * 50);
    // Writing to a String cannot fail.
    let _ = write!(json, r#"{{"GroupId":"{group}","MsgSeqList":["#);
    for (i, seq) in seqs.enumerate() {
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(json, r#"{comma}{{"MsgSeq":{seq}}}"#);
    }
    json.push_str("]}");
    Bytes::from(json)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn bodies_are_tencent_shaped_with_distinct_seqs_from_the_latest() {
        let settings = MixSettings {
            groups: 3,
            seqs_per_request: 5,
            latest: 6,
            distribution: Distribution::Zipf,
            zipf_exponent: 1.0,
            seed: 1,
        };
        let mix = Mix::new(&settings);
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..100 {
            let json: serde_json::Value = serde_json::from_slice(&mix.next_body(&mut rng)).expect("json");
            let mut seqs: Vec<u64> =
                json["MsgSeqList"].as_array().expect("list").iter().filter_map(|s| s["MsgSeq"].as_u64()).collect();
            seqs.sort_unstable();
            seqs.dedup();
            assert_eq!(seqs.len(), 5);
            assert!(seqs.iter().all(|s| (1..=6).contains(s)));
        }
    }

    #[test]
    fn a_fresh_mix_never_asks_for_a_group_twice() {
        let settings = MixSettings {
            groups: 3,
            seqs_per_request: 2,
            latest: 50,
            distribution: Distribution::Uniform,
            zipf_exponent: 1.0,
            seed: 1,
        };
        let mix = Mix::fresh("clients-bulk-".to_owned(), &settings);
        let mut rng = SmallRng::seed_from_u64(1);
        let groups: Vec<String> = (0..5)
            .map(|_| {
                let json: serde_json::Value = serde_json::from_slice(&mix.next_body(&mut rng)).expect("json");
                assert_eq!(json["MsgSeqList"].as_array().map(Vec::len), Some(2));
                json["GroupId"].as_str().unwrap_or_default().to_owned()
            })
            .collect();
        assert_eq!(groups, ["clients-bulk-0", "clients-bulk-1", "clients-bulk-2", "clients-bulk-3", "clients-bulk-4"]);
        assert_eq!(mix.group_count(), 0);
        assert!(mix.fill_body(7).starts_with(br#"{"GroupId":"loadgen-7","#));
    }
}
