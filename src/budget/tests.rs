use super::lease::{self, Lease, Next};
use super::*;

/// Takes calls from the limiter for three seconds of a fake clock, each as soon as it
/// is allowed plus `late`, and returns the grant times.
fn grants(per_second: u32, late: Duration) -> Vec<Duration> {
    use governor::clock::{Clock, FakeRelativeClock};
    let (quota, cells) = quota(NonZeroU32::new(per_second).unwrap());
    let clock = FakeRelativeClock::default();
    let limiter = RateLimiter::direct_with_clock(quota, clock.clone());
    let mut granted = Vec::new();
    let mut t = Duration::ZERO;
    while t < Duration::from_secs(3) {
        match limiter.check_n(cells) {
            Ok(Ok(())) => granted.push(t),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(clock.now()) + late;
                clock.advance(wait);
                t += wait;
            }
            Err(capacity) => panic!("{capacity}"),
        }
    }
    granted
}

fn busiest(grants: &[Duration]) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (last, at) in grants.iter().enumerate() {
        while *at - grants[first] >= Duration::from_secs(1) {
            first += 1;
        }
        best = best.max(last - first + 1);
    }
    best
}

#[test]
fn no_second_holds_more_than_per_second_calls_with_room_to_spare() {
    for per_second in [1, 2, 5, 10, 50, 200, 1000, 5000] {
        let punctual = busiest(&grants(per_second, Duration::ZERO));
        assert!(punctual < per_second as usize || per_second == 1, "{per_second}/s: {punctual} in one second");
    }
    assert_eq!(busiest(&grants(200, Duration::ZERO)), 195);
    assert_eq!(busiest(&grants(10, Duration::ZERO)), 9);
}

#[test]
fn a_little_lateness_costs_no_rate() {
    // Each call taken 2 ms after it was allowed: still 194 a second at 200/s.
    let late = grants(200, Duration::from_millis(2));
    let in_second_two = late.iter().filter(|t| (Duration::from_secs(1)..Duration::from_secs(2)).contains(t)).count();
    assert!(in_second_two >= 194, "{in_second_two}");
    assert!(busiest(&late) <= 195);
}

#[test]
fn the_others_rate_is_what_the_fleet_took_between_two_of_our_tokens() {
    let t = Instant::now();
    let mut others = Others::default();
    others.grant(10, 1, t);
    assert_eq!(others.rate(t), 0.0, "one grant says nothing yet");
    // 20 grants by others in the half second between ours.
    others.grant(31, 1, t + Duration::from_millis(500));
    assert_eq!(others.rate(t + Duration::from_millis(500)), 40.0);
    // The key expired and started over: no sample, the old one ages out.
    others.grant(1, 1, t + Duration::from_millis(600));
    assert_eq!(others.rate(t + Duration::from_millis(600)), 40.0);
    assert_eq!(others.rate(t + Duration::from_secs(3)), 0.0);
}

/// Another replica drained a backlog at the full rate while this one took a token every
/// half second, then went back to a tenth of it: the estimate is what it takes now after
/// one token of ours, not seconds later.
#[test]
fn the_others_rate_follows_their_calls_however_seldom_we_take_a_token() {
    let t = Instant::now();
    let half_second = Duration::from_millis(500);
    let mut others = Others::default();
    let mut grants = 0;
    let mut ours = |others: &mut Others, theirs: u64, n: u32| {
        grants += theirs + 1;
        others.grant(grants, 1, t + half_second * n);
    };
    ours(&mut others, 0, 0);
    for n in 1..=4 {
        ours(&mut others, 90, n);
    }
    assert!((179.0..=181.0).contains(&others.rate(t + half_second * 4)), "{}", others.rate(t));

    ours(&mut others, 9, 5);

    let now = others.rate(t + half_second * 5);
    assert!(now < 45.0, "{now}/s seen of the others' 18/s");
}

/// Tokens of ours a few milliseconds apart: samples of 0 or 1 grant of the others'
/// average out to their rate.
#[test]
fn the_others_rate_averages_our_frequent_tokens() {
    let t = Instant::now();
    let mut others = Others::default();
    // Ours every 5 ms, theirs one every other of ours: 100/s.
    let mut grants = 0;
    for n in 0..400u32 {
        grants += 1 + u64::from(n % 2);
        others.grant(grants, 1, t + Duration::from_millis(5) * n);
        if n >= 200 {
            let rate = others.rate(t + Duration::from_millis(5) * n);
            assert!((80.0..=120.0).contains(&rate), "{rate} at token {n}");
        }
    }
}

#[tokio::test]
async fn throttling_halves_the_rate_once_per_burst_and_it_recovers() {
    let gauge = Gauge::new("g", "g").unwrap();
    let per_second = NonZeroU32::new(200).unwrap();
    let config = BudgetConfig { per_second, backend: BudgetBackend::Local, fallback_per_second: per_second };
    let up = IntGauge::new("up", "up").unwrap();
    let b = Budget::new(&config, "k".into(), gauge.clone(), up, None).unwrap();
    b.throttled();
    b.throttled();
    let rate = b.effective_rate();
    assert!((99.0..=101.0).contains(&rate), "{rate}");
    assert!(b.interval() >= Duration::from_millis(9));
    b.pace(|p| p.updated = p.updated.checked_sub(RECOVERY).unwrap_or(p.updated));
    assert_eq!(b.effective_rate(), 200.0);
    assert_eq!(gauge.get(), 200.0);
}

/// The log lines written while `f` runs on this thread.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_throttling_episode_is_logged_when_it_starts_and_when_the_rate_is_back_not_per_answer() {
    let per_second = NonZeroU32::new(200).unwrap();
    let config = BudgetConfig { per_second, backend: BudgetBackend::Local, fallback_per_second: per_second };
    let up = IntGauge::new("up", "up").unwrap();
    let b = Budget::new(&config, "k".into(), Gauge::new("g", "g").unwrap(), up, None).unwrap();

    let during = logged(|| {
        for _ in 0..100 {
            b.throttled();
        }
    });
    tokio::time::advance(DECREASE_HOLDOFF * 2).await;
    let again = logged(|| b.throttled());
    tokio::time::advance(RECOVERY * 2).await;
    let after = logged(|| assert_eq!(b.effective_rate(), 200.0));

    assert_eq!(during.matches("upstream throttled").count(), 1, "{during}");
    assert_eq!(again, "", "a later answer in the same episode is counted, not logged");
    assert_eq!(after.matches("effective rate back").count(), 1, "{after}");
    assert!(after.contains("throttled_answers=101"), "{after}");
}

/// Sends bunched by a late start (here: all at once) are spread so that no rolling
/// second of send times holds more than 198 of a 200/s budget.
#[tokio::test(start_paused = true)]
async fn sends_bunched_after_their_tokens_still_leave_slack_in_every_second() {
    let per_second = NonZeroU32::new(200).unwrap();
    let config = BudgetConfig { per_second, backend: BudgetBackend::Local, fallback_per_second: per_second };
    let b = Budget::new(&config, "k".into(), Gauge::new("g", "g").unwrap(), IntGauge::new("up", "up").unwrap(), None)
        .unwrap();
    let t0 = Instant::now();
    let mut sent = Vec::new();
    for _ in 0..400 {
        b.before_send().await;
        sent.push(t0.elapsed());
    }
    // 198 at once, then each next one when the oldest of its second has left it.
    assert_eq!(sent.iter().filter(|t| t.is_zero()).count(), 198);
    let in_any_second =
        (0..sent.len()).map(|i| sent[i..].iter().take_while(|t| **t - sent[i] < Duration::from_secs(1)).count());
    assert_eq!(in_any_second.max(), Some(198));
    assert_eq!(sent[198], Duration::from_secs(1));
    assert_eq!(sent[399], Duration::from_secs(2));
}

/// In real time: governor keeps its own clock.
#[tokio::test]
async fn a_reloaded_limit_paces_the_next_tokens() {
    let gauge = Gauge::new("g", "g").unwrap();
    let per_second = NonZeroU32::new(200).unwrap();
    let config = BudgetConfig { per_second, backend: BudgetBackend::Local, fallback_per_second: per_second };
    let b = Budget::new(&config, "k".into(), gauge.clone(), IntGauge::new("up", "up").unwrap(), None).unwrap();
    let ten = NonZeroU32::new(10).unwrap();

    b.set_rates(ten, ten);
    let start = Instant::now();
    for _ in 0..5 {
        b.acquire().await;
    }

    assert_eq!((b.effective_rate(), gauge.get()), (10.0, 10.0));
    assert_eq!(b.interval(), pacing_interval(ten));
    // Five tokens at 10/s: the burst tolerance, then about 100 ms apart.
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());
}

/// The rolling-second rule with leases: a grant may be used up to [`lease::LATE`] after
/// its instant, and a replica places a lease's grants up to the answer's way back late;
/// calls then leave some time after their grant. The fleet's GCRA schedule (one token per
/// interval, one gap shortened by the tolerance after an idle spell) still puts at most
/// `per_second` calls into any rolling second with 15 ms of such skew between calls to
/// spare up to 1,000/s (10 ms above, where half the guard is the burst tolerance).
#[test]
fn grants_used_late_still_leave_every_rolling_second_within_per_second() {
    for per_second in [1, 2, 5, 10, 50, 100, 200, 1000, 5000] {
        let rate = NonZeroU32::new(per_second).unwrap();
        let skew = Duration::from_millis(if per_second <= BURST_ABOVE { 15 } else { 10 });
        let interval = pacing_interval(rate);
        // Calls in a window of a second plus the lateness and the skew, seen from the
        // GCRA's grant instants: the first at the window's start, the second a tolerance
        // early, then one per interval.
        let window = Duration::from_secs(1) + lease::LATE + skew + tolerance(rate);
        let most = (window.as_nanos() / interval.as_nanos()) as u32 + 1;
        assert!(most <= per_second, "{per_second}/s: {most} calls in a rolling second");
    }
}

/// A model of the script in Redis (the same GCRA, in Rust): grants up to `want` within
/// `horizon` of `now`, as offsets, or the wait until one lies within it.
struct ModelRedis {
    tat: Duration,
    interval: Duration,
    tolerance: Duration,
    grants: u64,
}

impl ModelRedis {
    fn lease(&mut self, now: Duration, want: u32, horizon: Duration) -> ModelAnswer {
        let mut offsets = Vec::new();
        while offsets.len() < want as usize {
            let at = self.tat.saturating_sub(self.tolerance).max(now);
            if at - now > horizon {
                break;
            }
            self.tat = self.tat.max(at) + self.interval;
            self.grants += 1;
            offsets.push(at - now);
        }
        let wait = if offsets.is_empty() {
            self.tat.saturating_sub(self.tolerance).max(now) - now - horizon
        } else {
            Duration::ZERO
        };
        (wait, self.grants, offsets)
    }
}

/// The script's answer: the wait, the fleet's grant count, the grants' offsets.
type ModelAnswer = (Duration, u64, Vec<Duration>);

/// One replica in the model: its lease, the call under way (when it reaches Redis, its
/// ask), when it was sent, the answer under way (when it arrives, when its call was sent,
/// the answer), its dispatcher's next wake-up, and the instants its tokens were handed out.
struct ModelReplica {
    lease: Lease,
    call: Option<(Duration, lease::Ask)>,
    sent: Duration,
    answer: Option<(Duration, Duration, ModelAnswer)>,
    wake: Duration,
    taken: Vec<Duration>,
}

/// `replicas` dispatchers that always have work, each a round trip of `rtt` away from one
/// model Redis (and up to 0.5 ms more each way, at random), for `seconds`: every token
/// each took, by the instant it was handed out.
fn fleet_model(per_second: u32, rtt: Duration, replicas: usize, seconds: u64) -> Vec<Vec<Duration>> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut jitter = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Duration::from_micros(seed % 500)
    };
    let rate = NonZeroU32::new(per_second).unwrap();
    let mut redis =
        ModelRedis { tat: Duration::ZERO, interval: pacing_interval(rate), tolerance: tolerance(rate), grants: 0 };
    let base = Instant::now();
    let mut fleet: Vec<ModelReplica> = (0..replicas)
        .map(|i| ModelReplica {
            lease: Lease::default(),
            call: None,
            sent: Duration::ZERO,
            answer: None,
            wake: Duration::from_micros(137 * i as u64),
            taken: Vec::new(),
        })
        .collect();
    let end = Duration::from_secs(seconds);
    loop {
        // The earliest event: a call reaching Redis, an answer reaching its replica, or a
        // dispatcher waking.
        let mut first: Option<(Duration, usize, u8)> = None;
        for (i, r) in fleet.iter().enumerate() {
            let mut consider = |t: Duration, kind: u8| {
                if first.is_none_or(|(best, _, _)| t < best) {
                    first = Some((t, i, kind));
                }
            };
            if let Some((arrives, _)) = r.call {
                consider(arrives, 0);
            }
            if let Some((at, _, _)) = r.answer {
                consider(at, 1);
            }
            consider(r.wake, 2);
        }
        let (now, i, kind) = first.unwrap();
        if now >= end {
            return fleet.into_iter().map(|r| r.taken).collect();
        }
        let r = &mut fleet[i];
        match kind {
            0 => {
                let (_, ask) = r.call.take().unwrap();
                let sent = r.sent;
                r.answer = Some((now + rtt / 2 + jitter(), sent, redis.lease(now, ask.want, ask.horizon)));
            }
            1 => {
                let (at, sent, (wait, _, offsets)) = r.answer.take().unwrap();
                r.lease.answered(base + sent, base + at, &offsets, wait);
                r.wake = r.wake.min(now);
            }
            _ => {
                let (next, ask) = r.lease.next(base + now);
                if let Some(ask) = ask {
                    r.sent = now;
                    r.call = Some((now + rtt / 2 + jitter(), ask));
                }
                r.wake = match next {
                    Next::At(at) if at <= base + now => {
                        assert!(r.lease.take(at, base + now));
                        r.taken.push(now);
                        now
                    }
                    Next::At(at) => at - base,
                    Next::Refilling => end + Duration::from_secs(1),
                    Next::After(after) => (after - base).max(now),
                };
            }
        }
    }
}

fn busiest_of(fleet: &[Vec<Duration>]) -> usize {
    let mut all: Vec<Duration> = fleet.iter().flatten().copied().collect();
    all.sort();
    busiest(&all)
}

/// Two replicas that always have work, a round trip of 0 to 200 ms from Redis: the fleet
/// takes the whole schedule (at least 97 % of what one local limiter would grant over the
/// last four of five seconds), and no rolling second holds more than `per_second` tokens.
#[test]
fn leased_grants_spend_the_whole_budget_whatever_the_round_trip() {
    for per_second in [50, 200] {
        let interval = pacing_interval(NonZeroU32::new(per_second).unwrap());
        let schedule = Duration::from_secs(4).as_nanos() / interval.as_nanos();
        for rtt_ms in [0, 5, 20, 200] {
            let rtt = Duration::from_millis(rtt_ms) + Duration::from_micros(200);
            let fleet = fleet_model(per_second, rtt, 2, 5);
            let steady =
                fleet.iter().flatten().filter(|t| **t >= Duration::from_secs(1)).count() as f64 / schedule as f64;
            let busiest = busiest_of(&fleet);
            assert!(steady >= 0.97, "{per_second}/s, {rtt_ms} ms: the fleet took {steady:.3} of the schedule");
            assert!(busiest <= per_second as usize, "{per_second}/s, {rtt_ms} ms: {busiest} in a second");
            let shares: Vec<usize> = fleet.iter().map(Vec::len).collect();
            eprintln!("{per_second}/s, {rtt_ms} ms: {steady:.3} of the schedule, busiest {busiest}, shares {shares:?}");
            assert!(fleet.iter().all(|r| r.len() as f64 > schedule as f64 * 0.2), "both replicas are served");
        }
    }
}

/// The lease follows the dispatcher's demand: one grant for a first token, then more per
/// call as the dispatcher keeps finding the lease empty; a steady replica asks again a
/// round trip before the lease runs out.
#[tokio::test(start_paused = true)]
async fn a_lease_grows_with_demand_and_is_renewed_before_it_runs_out() {
    let mut lease = Lease::default();
    let t0 = Instant::now();
    let (next, ask) = lease.next(t0);
    assert_eq!(next, Next::Refilling);
    assert_eq!(ask.map(|a| a.want), Some(1));
    assert_eq!(lease.next(t0).1, None, "one call at a time");
    let rtt = Duration::from_millis(20);
    lease.answered(t0, t0 + rtt, &[Duration::ZERO], Duration::ZERO);
    assert_eq!(lease.horizon(), Duration::from_millis(50), "two round trips and a margin");
    let (next, _) = lease.next(t0 + rtt);
    assert_eq!(next, Next::At(t0 + rtt));
    assert!(lease.take(t0 + rtt, t0 + rtt));
    // Empty again: the dispatcher waits, so the next lease is twice the last.
    let (_, ask) = lease.next(t0 + rtt);
    assert_eq!(ask.map(|a| a.want), Some(2));
    let step = Duration::from_millis(10);
    let now = t0 + rtt * 2;
    let offsets: Vec<Duration> = (0..30).map(|i| step * i).collect();
    lease.answered(t0 + rtt, now, &offsets, Duration::ZERO);
    for i in 0..30 {
        let at = now + step * i;
        let (next, ask) = lease.next(at);
        assert_eq!(next, Next::At(at));
        // The last grant is 290 ms ahead; asked again once it is within a round trip and
        // the margin (25 ms), with 100/s of demand seen (more than 20/s: a grant likely
        // taken within those 25 ms).
        assert_eq!(ask.is_some(), i == 27, "grant {i}");
        assert!(lease.take(at, at));
    }
    let demand = lease.demand(now + step * 29);
    assert!((60.0..=100.0).contains(&demand), "{demand}/s");

    // Idle for a second: the next lease starts again from one grant.
    let later = now + Duration::from_secs(1);
    lease.answered(later, later, &[], Duration::ZERO);
    assert_eq!(lease.next(later + rtt).1.map(|a| a.want), Some(1));
}

/// A grant the dispatcher did not take within [`lease::LATE`] of its instant is dropped,
/// never handed out later; a reload or an outage drops the lease.
#[tokio::test(start_paused = true)]
async fn late_grants_are_dropped_not_used() {
    let mut lease = Lease::default();
    let t0 = Instant::now();
    let _ = lease.next(t0);
    let ms = Duration::from_millis;
    lease.answered(t0, t0 + ms(1), &[ms(0), ms(20), ms(40)], Duration::ZERO);
    assert_eq!(lease.held(), 3);
    let (next, _) = lease.next(t0 + ms(1) + ms(20) + lease::LATE + ms(1));
    assert_eq!(next, Next::At(t0 + ms(41)), "the first two passed unused");
    lease.clear();
    assert_eq!(lease.held(), 0);
    assert!(!lease.take(t0 + ms(41), t0 + ms(41)));
}

/// When Redis has no grant within the horizon (the others hold the schedule ahead), the
/// replica asks again when one will, less half a round trip, not at once.
#[tokio::test(start_paused = true)]
async fn no_grant_within_the_horizon_means_asking_again_later() {
    let mut lease = Lease::default();
    let t0 = Instant::now();
    let _ = lease.next(t0);
    let ms = Duration::from_millis;
    lease.answered(t0, t0 + ms(20), &[], ms(30));
    let (next, ask) = lease.next(t0 + ms(20));
    assert_eq!((next, ask), (Next::After(t0 + ms(40)), None));
    let (next, ask) = lease.next(t0 + ms(40));
    assert_eq!(next, Next::Refilling);
    assert!(ask.is_some());
}
