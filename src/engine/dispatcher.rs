//! The dispatcher of one (app, API): the task that takes the budget's tokens one at a
//! time and spends each on the work the [`Engine`]'s queue picks.
//!
//! Invariant: one dispatcher per (app, API), the only caller of
//! [`Budget::acquire`](crate::budget::Budget::acquire) for it.

use std::sync::Arc;

use prometheus::Histogram;
use tokio::time::Instant;

use super::Engine;
use super::batch::Dispatch;
use super::queue::Job;
use crate::budget::Budget;
use crate::tencent::domain::{GroupId, MsgSeq};

/// The dispatcher of one (app, API): forever, wait for ready work, take a token, spend
/// it on the first ready entry; a batch is handed to `send` (`fetch::run` in its own
/// task). Owned and aborted by the gateway's task set.
pub async fn run(
    engine: Arc<Engine>,
    budget: Arc<Budget>,
    budget_wait: Histogram,
    mut send: impl FnMut(Dispatch) + Send,
    dropped: impl Fn(GroupId, Vec<MsgSeq>) + Send + Sync,
) {
    let mut last_grant: Option<Instant> = None;
    let mut last_pace = budget.interval();
    loop {
        if !engine.wait_for_ready_work(|| !budget.contended(), &dropped).await {
            // Waiting for work is not the budget's slowness: restart the measurement.
            last_grant = None;
        }
        budget.acquire().await;
        let granted = Instant::now();
        // The budget's own pace sped up by half or more (back on the shared Redis budget
        // after running on its fallback): the drain rate seen so far is no evidence.
        let pace = budget.interval();
        if pace * 2 <= last_pace {
            engine.estimates().forget_interval();
            last_grant = None;
        }
        last_pace = pace;
        if let Some(previous) = last_grant {
            engine.estimates().observe_interval(granted - previous);
        }
        last_grant = Some(granted);
        match engine.pop(granted, &budget_wait, !budget.contended()) {
            Some(Job::Batch(dispatch)) => send(dispatch),
            // A retry whose caller gave up meanwhile: the token is spent, as it must be
            // counted anyway (it cannot be un-taken from Redis).
            Some(Job::Permit(tx)) => drop(tx.send(())),
            None => {}
        }
        for (group, seqs) in engine.take_dropped() {
            dropped(group, seqs);
        }
    }
}
