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
    others.grant(10, t);
    assert_eq!(others.rate(t), 0.0, "one grant says nothing yet");
    // 20 grants by others in the half second between ours.
    others.grant(31, t + Duration::from_millis(500));
    assert_eq!(others.rate(t + Duration::from_millis(500)), 40.0);
    // The key expired and started over: no sample, the old one ages out.
    others.grant(1, t + Duration::from_millis(600));
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
        others.grant(grants, t + half_second * n);
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
        others.grant(grants, t + Duration::from_millis(5) * n);
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
