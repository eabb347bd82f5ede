//! Decayed rates and averages over 1, 10 and 100 seconds: the pure maths behind the
//! `*_per_second`, `*_utilization_ratio` and `*_avg` gauges of `/metrics`.
//!
//! The admin thread samples every core's counters about once a second (off the data
//! path) and feeds each sample here with the time that passed since the previous one.
//! Each window `W` keeps an exponentially weighted moving average of the instantaneous
//! value `x` (a counter's `delta / dt`, or a gauge's reading):
//!
//! ```text
//! alpha = max(1 - exp(-dt / W), dt / age)      age = seconds observed so far
//! avg  += alpha * (x - avg)
//! ```
//!
//! `1 - exp(-dt / W)` makes the weight of a sample decay by `e` every `W` seconds whatever
//! the sampling interval (a late sample gets a larger weight, not a wrong one), so a step
//! change reaches 63 % of its new level after `W` seconds and 95 % after `3 W`. The
//! `dt / age` term is a warm-up: until `age` is a little past `W` (where `dt / age` falls
//! below the decay weight: 1.6 s, 10.5 s and 100.5 s at 1 s sampling) the average is the
//! plain mean of everything seen so far (the first sample is taken as it is), so a freshly
//! started gateway reports its real rate at once instead of creeping up from zero for
//! minutes.
//!
//! Nothing here reads a clock or an atomic: callers pass values and `dt`, so the tests
//! feed known inputs and check known outputs.
#![forbid(unsafe_code)]

/// The decay windows, as labelled in `/metrics` (`window="10s"`), and their time
/// constants in seconds.
pub const WINDOWS: [(&str, f64); 3] = [("1s", 1.0), ("10s", 10.0), ("100s", 100.0)];

/// How many windows every tracker keeps.
pub const NWIN: usize = WINDOWS.len();

/// Exponentially weighted moving averages of one value over every window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ewma {
    /// Seconds of samples seen (the warm-up term).
    age: f64,
    avg: [f64; NWIN],
}

impl Ewma {
    /// Folds in the value `x` that held over the last `dt` seconds. A `dt` that is not
    /// positive (a clock that did not move) or a value that is not finite is ignored.
    pub fn observe(&mut self, x: f64, dt: f64) {
        if !(dt > 0.0 && dt.is_finite() && x.is_finite()) {
            return;
        }
        self.age += dt;
        for (avg, (_, tau)) in self.avg.iter_mut().zip(WINDOWS) {
            let alpha = (1.0 - (-dt / tau).exp()).max(dt / self.age).min(1.0);
            *avg += alpha * (x - *avg);
        }
    }

    /// The average over window `w` (an index into [`WINDOWS`]); 0 before any sample.
    pub fn get(&self, w: usize) -> f64 {
        self.avg[w]
    }

    /// Every window's average, in [`WINDOWS`] order.
    pub fn all(&self) -> [f64; NWIN] {
        self.avg
    }

    /// Whether any sample has been folded in yet.
    pub fn primed(&self) -> bool {
        self.age > 0.0
    }
}

/// The decayed per-second rate of a monotonically increasing counter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CounterRate {
    last: Option<u64>,
    ewma: Ewma,
}

impl CounterRate {
    /// Takes the counter's current `value`, read `dt` seconds after the previous one. The
    /// first reading is only a baseline. A counter that went backwards (a restart) is
    /// re-based: that interval counts as no events rather than a huge negative rate.
    pub fn observe(&mut self, value: u64, dt: f64) {
        if let Some(last) = self.last {
            let delta = value.saturating_sub(last);
            if dt > 0.0 {
                self.ewma.observe(delta as f64 / dt, dt);
            }
        }
        self.last = Some(value);
    }

    /// Events per second over window `w`.
    pub fn get(&self, w: usize) -> f64 {
        self.ewma.get(w)
    }

    pub fn all(&self) -> [f64; NWIN] {
        self.ewma.all()
    }
}

/// The share of time a core's loop was busy: the ratio of two decayed rates, busy time
/// over busy plus waiting time. Both are counters of nanoseconds that the core adds to
/// once per loop pass; taking the ratio of the decayed rates (not decaying a per-second
/// ratio) weights every second by the time it actually covered, and a second in which
/// the core finished no pass changes neither rate's share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Utilisation {
    busy: CounterRate,
    wait: CounterRate,
}

impl Utilisation {
    pub fn observe(&mut self, busy_ns: u64, wait_ns: u64, dt: f64) {
        self.busy.observe(busy_ns, dt);
        self.wait.observe(wait_ns, dt);
    }

    /// Busy share in `[0, 1]` over window `w`; 0 before two samples.
    pub fn get(&self, w: usize) -> f64 {
        let (b, t) = (self.busy.get(w), self.busy.get(w) + self.wait.get(w));
        if t > 0.0 {
            (b / t).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    pub fn all(&self) -> [f64; NWIN] {
        std::array::from_fn(|w| self.get(w))
    }
}

/// The decayed average of a gauge sampled once a second (a queue length, say).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GaugeAvg {
    ewma: Ewma,
}

impl GaugeAvg {
    /// Takes the gauge's current reading; `dt` is the time since the previous reading
    /// (the weight of this one). The first reading counts fully.
    pub fn observe(&mut self, value: f64, dt: f64) {
        self.ewma.observe(value, dt);
    }

    pub fn get(&self, w: usize) -> f64 {
        self.ewma.get(w)
    }

    pub fn all(&self) -> [f64; NWIN] {
        self.ewma.all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[track_caller]
    fn assert_close(got: f64, want: f64) {
        assert!(close(got, want), "got {got}, want {want}");
    }

    #[test]
    fn windows_are_1_10_100_seconds() {
        assert_eq!(WINDOWS.map(|w| w.0), ["1s", "10s", "100s"]);
        assert_eq!(WINDOWS.map(|w| w.1), [1.0, 10.0, 100.0]);
    }

    #[test]
    fn a_constant_input_is_reported_exactly_from_the_first_sample() {
        let mut e = Ewma::default();
        assert!(!e.primed());
        assert_eq!(e.all(), [0.0; NWIN]);
        for _ in 0..250 {
            e.observe(42.0, 1.0);
            for w in 0..NWIN {
                assert_close(e.get(w), 42.0);
            }
        }
        assert!(e.primed());
    }

    #[test]
    fn warm_up_is_the_plain_mean_until_the_window_is_full() {
        // Samples 10, 20, 30, 40 one second apart: the 10 s and 100 s windows are still
        // warming up and hold the running mean; the 1 s window is already decaying.
        let mut e = Ewma::default();
        let mut sum = 0.0;
        for (i, x) in [10.0, 20.0, 30.0, 40.0].into_iter().enumerate() {
            e.observe(x, 1.0);
            sum += x;
            let mean = sum / (i + 1) as f64;
            assert_close(e.get(1), mean);
            assert_close(e.get(2), mean);
        }
        // 1 s window by hand: a = 1 - e^-1; first sample taken as is (warm-up alpha 1).
        let a = 1.0 - (-1.0f64).exp();
        let mut v = 10.0;
        for x in [20.0, 30.0, 40.0] {
            v += a * (x - v);
        }
        assert_close(e.get(0), v);
    }

    #[test]
    fn a_step_reaches_63_percent_after_one_time_constant() {
        // 200 s at 0, then a step to 100 sampled every second: after W seconds each
        // window stands at 100 * (1 - e^-1) (the warm-up is long over for 1 s and 10 s;
        // the 100 s window is still averaging until its age passes 100 s, so use 300 s).
        let mut e = Ewma::default();
        for _ in 0..300 {
            e.observe(0.0, 1.0);
        }
        let want = 100.0 * (1.0 - (-1.0f64).exp());
        let mut after = [0.0; NWIN];
        for t in 1..=100 {
            e.observe(100.0, 1.0);
            if t == 1 {
                after[0] = e.get(0);
            }
            if t == 10 {
                after[1] = e.get(1);
            }
            if t == 100 {
                after[2] = e.get(2);
            }
        }
        for w in after {
            assert_close(w, want);
        }
    }

    #[test]
    fn the_decay_does_not_depend_on_how_often_it_is_sampled() {
        // One 4 s interval weighs exactly as four 1 s intervals of the same value.
        let mut coarse = Ewma::default();
        let mut fine = Ewma::default();
        for _ in 0..500 {
            coarse.observe(5.0, 1.0);
            fine.observe(5.0, 1.0);
        }
        coarse.observe(9.0, 4.0);
        for _ in 0..4 {
            fine.observe(9.0, 1.0);
        }
        for w in 0..NWIN {
            assert_close(coarse.get(w), fine.get(w));
        }
        // And the known value: 9 - 4 * e^(-4/W).
        assert_close(coarse.get(1), 9.0 - 4.0 * (-0.4f64).exp());
    }

    #[test]
    fn bad_intervals_and_values_are_ignored() {
        let mut e = Ewma::default();
        e.observe(7.0, 0.0);
        e.observe(7.0, -1.0);
        e.observe(f64::NAN, 1.0);
        e.observe(7.0, f64::INFINITY);
        assert!(!e.primed());
        e.observe(7.0, 1.0);
        assert_eq!(e.all(), [7.0; NWIN]);
    }

    #[test]
    fn counter_rate_is_delta_over_dt_and_the_first_reading_is_a_baseline() {
        let mut r = CounterRate::default();
        r.observe(1_000, 1.0);
        assert_eq!(r.all(), [0.0; NWIN], "one reading gives no rate");
        r.observe(1_500, 0.5); // 500 events in half a second
        assert_eq!(r.all(), [1_000.0; NWIN]);
        r.observe(1_500, 1.0); // nothing for a second
                               // Every window is still warming up: the mean over 1.5 s = 500 events / 1.5 s.
        for w in 0..NWIN {
            assert_close(r.get(w), 500.0 / 1.5);
        }
        r.observe(1_500, 1.0); // nothing for another second
                               // The 1 s window now decays (1 - e^-1 outweighs 1 / 2.5); the others average.
        assert_close(r.get(0), 500.0 / 1.5 * (-1.0f64).exp());
        assert_close(r.get(1), 500.0 / 2.5);
        assert_close(r.get(2), 500.0 / 2.5);
    }

    #[test]
    fn a_counter_that_goes_backwards_is_rebased() {
        let mut r = CounterRate::default();
        r.observe(100, 1.0);
        r.observe(110, 1.0);
        r.observe(5, 1.0); // restarted: this interval counts as 0 events
        r.observe(15, 1.0);
        assert_close(r.get(2), (10.0 + 0.0 + 10.0) / 3.0);
    }

    #[test]
    fn utilisation_is_busy_over_busy_plus_wait() {
        let mut u = Utilisation::default();
        u.observe(0, 0, 1.0);
        assert_eq!(u.all(), [0.0; NWIN]);
        // 250 ms busy, 750 ms waiting per second.
        for s in 1..=20u64 {
            u.observe(s * 250_000_000, s * 750_000_000, 1.0);
        }
        for w in 0..NWIN {
            assert_close(u.get(w), 0.25);
        }
        // A second with no completed pass moves neither counter: the share stays.
        u.observe(20 * 250_000_000, 20 * 750_000_000, 1.0);
        assert_close(u.get(1), 0.25);
        // Fully busy from now on: the 1 s window follows quickly, 100 s barely.
        for s in 21..=30u64 {
            u.observe(
                20 * 250_000_000 + (s - 20) * 1_000_000_000,
                20 * 750_000_000,
                1.0,
            );
        }
        assert!(u.get(0) > 0.99, "{}", u.get(0));
        assert!(u.get(2) < 0.6, "{}", u.get(2));
        assert!(u.get(2) > 0.25);
    }

    #[test]
    fn gauge_average_counts_the_first_reading() {
        let mut g = GaugeAvg::default();
        g.observe(4096.0, 1.0);
        assert_eq!(g.all(), [4096.0; NWIN]);
        g.observe(0.0, 1.0);
        let a1 = 1.0 - (-1.0f64).exp();
        assert_close(g.get(0), 4096.0 * (1.0 - a1));
        assert_close(g.get(1), 2048.0);
        assert_close(g.get(2), 2048.0);
    }
}
