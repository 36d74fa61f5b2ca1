//! The request mix: which group each request asks about (uniform or Zipf) and which of
//! the group's latest MsgSeqs. Bodies are Tencent's request shape, built as bytes once per
//! request before it is timed.

use std::fmt::Write;

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
}

impl Mix {
    pub fn new(s: &MixSettings) -> Mix {
        let groups = match s.distribution {
            Distribution::Uniform => Groups::Uniform(s.groups),
            Distribution::Zipf => Groups::Zipf(zipf_cdf(s.groups, s.zipf_exponent)),
        };
        Mix { groups, per_request: s.seqs_per_request, latest: s.latest }
    }

    pub fn group_count(&self) -> usize {
        match &self.groups {
            Groups::Uniform(n) => *n,
            Groups::Zipf(cdf) => cdf.len(),
        }
    }

    /// A request for a drawn group and `per_request` distinct MsgSeqs out of 1..=latest.
    pub fn next_body(&self, rng: &mut SmallRng) -> Bytes {
        let group = self.draw_group(rng);
        // `Settings::check` guarantees per_request <= latest, so `sample` cannot panic.
        let seqs = index::sample(rng, self.latest, self.per_request).into_iter().map(|i| i as u64 + 1);
        body(group, seqs)
    }

    /// A request for all of `group`'s latest MsgSeqs (to fill the cache).
    pub fn fill_body(&self, group: usize) -> Bytes {
        body(group, 1..=self.latest as u64)
    }

    fn draw_group(&self, rng: &mut SmallRng) -> usize {
        match &self.groups {
            Groups::Uniform(n) => rng.random_range(0..*n),
            Groups::Zipf(cdf) => {
                let u: f64 = rng.random();
                cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
            }
        }
    }
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

/// `{"GroupId":"loadgen-7","MsgSeqList":[{"MsgSeq":3},…]}`
pub fn body(group: usize, seqs: impl Iterator<Item = u64>) -> Bytes {
    let mut json = String::with_capacity(64 + 16 * 50);
    // Writing to a String cannot fail.
    let _ = write!(json, r#"{{"GroupId":"{GROUP_PREFIX}{group}","MsgSeqList":["#);
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
}
