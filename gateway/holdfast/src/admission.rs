//! Admission control: which new connections a core takes on, decided before TLS does any
//! work for them. Pure: the core asks and acts; nothing here touches a ring, a socket or
//! the clock (time comes in as milliseconds since the core started).
//!
//! Three questions, in the order a connection meets them:
//! 1. The process: is there room under `limits.max_conns`? ([`ProcessCap`], the one
//!    counter the cores share, asked once at accept and once at close.)
//! 2. Its source address: does it hold fewer than its share of `limits.max_conns_per_ip`
//!    on this core? ([`Admission::hold`]; an IPv4 address, or an IPv6 /64, is one source.)
//! 3. The core's handshake budget: is a token of the full-handshake rate free, and a slot
//!    among the handshakes in progress? If not, the connection waits in a FIFO, unread
//!    (its ClientHello stays in the kernel's socket buffer), until a token and a slot are
//!    free or its wait is over ([`Admission::next`]), then it is refused.
//!
//! A handshake that turns out to be a resumption gives its token back: the rate limits
//! full handshakes, the expensive kind.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One source address for the per-address cap: an IPv4 address, or the /64 prefix of an
/// IPv6 address (a host gets a whole /64, so counting single v6 addresses would cap
/// nothing). IPv4-mapped IPv6 addresses count as their IPv4 address. The two spaces do not
/// collide: an IPv4 key has the top 32 bits set, which no /64 in 2000::/3 (the global
/// unicast space) has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(u64);

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpKey(0xffff_ffff_0000_0000 | u32::from(v4) as u64),
            IpAddr::V6(v6) => IpKey((u128::from(v6) >> 64) as u64),
        }
    }
}

/// The limits of one core, from `[limits]` (a value of 0 turns that limit off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections one source may hold on this core ([`per_core_share`] of the process cap).
    pub per_ip: u32,
    /// Full handshakes started per second.
    pub handshake_rate: u32,
    /// Handshakes started and not yet finished.
    pub in_progress: u32,
    /// How long a connection waits for a handshake slot before it is refused.
    pub wait_ms: u64,
}

/// This core's share of a per-address cap. SO_REUSEPORT spreads one source's connections
/// over the cores by their port, so each core holds about `cap / cores`; rounding up keeps
/// a cap of 1 meaning "at least one connection". 0 (no cap) stays 0.
pub fn per_core_share(cap: u32, cores: u8) -> u32 {
    if cap == 0 {
        return 0;
    }
    cap.div_ceil(u32::from(cores.max(1)))
}

/// What became of the first connections waiting for a handshake slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start its handshake now (a token and a slot are taken for it).
    Start { slot: u32, gen: u32 },
    /// It waited too long: refuse it.
    Expired { slot: u32, gen: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    slot: u32,
    gen: u32,
    since_ms: u64,
}

/// A token bucket in thousandths of a token, so refills need no floating point. Holds at
/// most a tenth of a second of tokens: a storm is let in at the rate, not in a one-second
/// burst on top of it.
#[derive(Debug)]
struct Bucket {
    milli: u64,
    at_ms: u64,
}

impl Bucket {
    fn cap(rate: u32) -> u64 {
        u64::from(rate.div_ceil(10).max(1)) * 1000
    }

    fn refill(&mut self, now_ms: u64, rate: u32) {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = now_ms.max(self.at_ms);
        self.milli = self
            .milli
            .saturating_add(elapsed * u64::from(rate))
            .min(Self::cap(rate));
    }
}

/// One core's admission state.
#[derive(Debug)]
pub struct Admission {
    per_ip: HashMap<IpKey, u32>,
    bucket: Bucket,
    in_progress: u32,
    waiting: VecDeque<Waiter>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new()
    }
}

impl Admission {
    pub fn new() -> Admission {
        Admission {
            per_ip: HashMap::new(),
            // Starts full: the first tenth of a second's handshakes need not wait.
            bucket: Bucket {
                milli: u64::MAX,
                at_ms: 0,
            },
            in_progress: 0,
            waiting: VecDeque::new(),
        }
    }

    /// Counts a new connection from `key` against the per-address cap. False (nothing
    /// counted) when the source already holds `limits.per_ip` connections on this core.
    pub fn hold(&mut self, key: IpKey, limits: &Limits) -> bool {
        let n = self.per_ip.entry(key).or_insert(0);
        if limits.per_ip != 0 && *n >= limits.per_ip {
            if *n == 0 {
                self.per_ip.remove(&key);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A connection counted by [`Admission::hold`] is gone.
    pub fn release(&mut self, key: IpKey) {
        match self.per_ip.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.per_ip.remove(&key);
            }
            None => debug_assert!(false, "released a source that holds nothing"),
        }
    }

    /// Connections `key` holds on this core.
    pub fn held(&self, key: IpKey) -> u32 {
        self.per_ip.get(&key).copied().unwrap_or(0)
    }

    /// May a new connection's handshake start now? If so a token and a slot are taken;
    /// if not (or if others are already waiting: first come, first served) it is queued,
    /// and [`Admission::next`] says later when it starts or is refused.
    pub fn arrive(&mut self, slot: u32, gen: u32, now_ms: u64, limits: &Limits) -> bool {
        if self.waiting.is_empty() && self.take(now_ms, limits) {
            return true;
        }
        self.waiting.push_back(Waiter {
            slot,
            gen,
            since_ms: now_ms,
        });
        false
    }

    /// The next waiting connection to start or refuse, if any is due. `live` says whether
    /// a waiter's connection is still there (it may have closed while it waited): ones
    /// that are not are dropped without taking a token.
    pub fn next(
        &mut self,
        now_ms: u64,
        limits: &Limits,
        live: impl Fn(u32, u32) -> bool,
    ) -> Option<Next> {
        while let Some(&w) = self.waiting.front() {
            if !live(w.slot, w.gen) {
                self.waiting.pop_front();
                continue;
            }
            if now_ms.saturating_sub(w.since_ms) > limits.wait_ms {
                self.waiting.pop_front();
                return Some(Next::Expired {
                    slot: w.slot,
                    gen: w.gen,
                });
            }
            if !self.take(now_ms, limits) {
                return None;
            }
            self.waiting.pop_front();
            return Some(Next::Start {
                slot: w.slot,
                gen: w.gen,
            });
        }
        None
    }

    fn take(&mut self, now_ms: u64, limits: &Limits) -> bool {
        if limits.in_progress != 0 && self.in_progress >= limits.in_progress {
            return false;
        }
        if limits.handshake_rate != 0 {
            self.bucket.refill(now_ms, limits.handshake_rate);
            if self.bucket.milli < 1000 {
                return false;
            }
            self.bucket.milli -= 1000;
        }
        self.in_progress += 1;
        true
    }

    /// A started handshake finished (or its connection closed first). A resumed one gives
    /// its rate token back.
    pub fn finished(&mut self, resumed: bool, limits: &Limits) {
        debug_assert!(
            self.in_progress > 0,
            "a handshake finished that never started"
        );
        self.in_progress = self.in_progress.saturating_sub(1);
        if resumed && limits.handshake_rate != 0 {
            self.bucket.milli = (self.bucket.milli + 1000).min(Bucket::cap(limits.handshake_rate));
        }
    }

    pub fn in_progress(&self) -> u32 {
        self.in_progress
    }

    /// Connections waiting for a handshake slot (including any that closed meanwhile and
    /// are not pruned yet).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The process-wide connection cap: one counter shared by every core. An atomic add at
/// accept and a subtract at close are the only shared writes, a few nanoseconds against
/// the tens of microseconds an accept and a handshake cost, and they are on the accept
/// path, never on the per-frame path. Splitting the cap into per-core shares instead
/// would refuse clients on a busy core while another has room.
#[derive(Debug, Clone, Default)]
pub struct ProcessCap(Arc<AtomicU64>);

impl ProcessCap {
    pub fn new() -> ProcessCap {
        ProcessCap::default()
    }

    /// Takes a place for one connection; false (nothing taken) at `max` (0 = no cap).
    pub fn take(&self, max: u64) -> bool {
        let before = self.0.fetch_add(1, Ordering::Relaxed);
        if max != 0 && before >= max {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release(&self) {
        let before = self.0.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "released a connection never taken");
    }

    pub fn held(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limits(per_ip: u32, rate: u32, in_progress: u32, wait_ms: u64) -> Limits {
        Limits {
            per_ip,
            handshake_rate: rate,
            in_progress,
            wait_ms,
        }
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_slash_64s() {
        let a = IpKey::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let b = IpKey::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_ne!(a, b);
        let mapped = IpKey::of(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(a, mapped, "a v4-mapped address is its v4 address");
        let v6 = |s: &str| IpKey::of(IpAddr::V6(s.parse::<Ipv6Addr>().unwrap()));
        assert_eq!(v6("2001:db8:1:2::1"), v6("2001:db8:1:2:ffff::9"));
        assert_ne!(v6("2001:db8:1:2::1"), v6("2001:db8:1:3::1"));
        assert_ne!(v6("2001:db8::1"), a);
    }

    #[test]
    fn per_address_cap_holds_and_frees() {
        let l = limits(2, 0, 0, 0);
        let mut adm = Admission::new();
        let k = IpKey::of(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let other = IpKey::of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(adm.hold(k, &l));
        assert!(adm.hold(k, &l));
        assert!(!adm.hold(k, &l), "third from one source refused");
        assert!(adm.hold(other, &l), "another source is not affected");
        assert_eq!(adm.held(k), 2);
        adm.release(k);
        assert!(adm.hold(k, &l), "a freed place can be taken again");
        adm.release(k);
        adm.release(k);
        adm.release(other);
        assert!(
            adm.per_ip.is_empty(),
            "no entry kept for a source with nothing"
        );
        // 0 = no cap.
        let open = limits(0, 0, 0, 0);
        for _ in 0..1000 {
            assert!(adm.hold(k, &open));
        }
    }

    #[test]
    fn the_cap_is_shared_out_over_cores_rounding_up() {
        assert_eq!(per_core_share(64, 2), 32);
        assert_eq!(per_core_share(65, 2), 33);
        assert_eq!(per_core_share(1, 4), 1);
        assert_eq!(per_core_share(0, 4), 0);
        assert_eq!(per_core_share(10, 0), 10);
    }

    #[test]
    fn the_rate_admits_a_tenth_second_burst_then_paces() {
        let l = limits(0, 100, 0, 10_000);
        let mut adm = Admission::new();
        // Burst: 10 tokens (a tenth of a second at 100/s).
        let started = (0..20).filter(|&i| adm.arrive(i, 0, 0, &l)).count();
        assert_eq!(started, 10);
        assert_eq!(adm.waiting(), 10);
        // 10 ms later one more token: the first waiter starts, in order.
        assert_eq!(adm.next(5, &l, |_, _| true), None);
        assert_eq!(
            adm.next(10, &l, |_, _| true),
            Some(Next::Start { slot: 10, gen: 0 })
        );
        assert_eq!(adm.next(10, &l, |_, _| true), None);
        // Over a second, at most 100 more start.
        let mut n = 0;
        for ms in 11..=1010 {
            while let Some(Next::Start { .. }) = adm.next(ms, &l, |_, _| true) {
                n += 1;
            }
        }
        assert_eq!(n, 9, "the other nine waiters, then nobody is left");
        assert_eq!(adm.in_progress(), 20);
    }

    #[test]
    fn in_progress_cap_queues_until_a_handshake_finishes() {
        let l = limits(0, 0, 2, 1000);
        let mut adm = Admission::new();
        assert!(adm.arrive(0, 0, 0, &l));
        assert!(adm.arrive(1, 0, 0, &l));
        assert!(!adm.arrive(2, 0, 0, &l));
        assert_eq!(adm.next(1, &l, |_, _| true), None);
        adm.finished(false, &l);
        assert_eq!(
            adm.next(2, &l, |_, _| true),
            Some(Next::Start { slot: 2, gen: 0 })
        );
        assert_eq!(adm.in_progress(), 2);
    }

    #[test]
    fn waiters_are_refused_after_their_wait_and_dead_ones_skipped() {
        let l = limits(0, 0, 1, 500);
        let mut adm = Admission::new();
        assert!(adm.arrive(0, 0, 0, &l));
        assert!(!adm.arrive(1, 7, 100, &l));
        assert!(!adm.arrive(2, 0, 200, &l));
        assert!(!adm.arrive(3, 0, 300, &l));
        // Slot 2 closed while it waited: skipped, never started or refused.
        let live = |slot: u32, _| slot != 2;
        assert_eq!(adm.next(600, &l, live), None, "nobody is over 500 ms yet");
        assert_eq!(
            adm.next(601, &l, live),
            Some(Next::Expired { slot: 1, gen: 7 })
        );
        assert_eq!(adm.next(601, &l, live), None);
        assert_eq!(adm.waiting(), 1);
        assert_eq!(
            adm.next(801, &l, live),
            Some(Next::Expired { slot: 3, gen: 0 })
        );
        assert_eq!(adm.waiting(), 0);
    }

    #[test]
    fn a_newcomer_waits_behind_those_already_waiting() {
        let l = limits(0, 0, 1, 1000);
        let mut adm = Admission::new();
        assert!(adm.arrive(0, 0, 0, &l));
        assert!(!adm.arrive(1, 0, 0, &l));
        adm.finished(false, &l);
        // A slot is free, but slot 1 was first.
        assert!(!adm.arrive(2, 0, 1, &l));
        assert_eq!(
            adm.next(1, &l, |_, _| true),
            Some(Next::Start { slot: 1, gen: 0 })
        );
    }

    #[test]
    fn resumed_handshakes_give_their_token_back() {
        let l = limits(0, 10, 0, 1000);
        let mut adm = Admission::new();
        // Bucket of 1 token at 10/s.
        assert!(adm.arrive(0, 0, 0, &l));
        assert!(!adm.arrive(1, 0, 0, &l));
        adm.finished(true, &l);
        assert_eq!(
            adm.next(0, &l, |_, _| true),
            Some(Next::Start { slot: 1, gen: 0 })
        );
        adm.finished(false, &l);
        assert!(!adm.arrive(2, 0, 0, &l), "a full handshake keeps its token");
    }

    #[test]
    fn the_process_cap_is_shared() {
        let cap = ProcessCap::new();
        let other_core = cap.clone();
        assert!(cap.take(2));
        assert!(other_core.take(2));
        assert!(!cap.take(2));
        assert_eq!(cap.held(), 2);
        other_core.release();
        assert!(cap.take(2));
        assert!(ProcessCap::new().take(0), "0 = no cap");
    }
}
