//! A hashed timing wheel for one core's connection timers (handshake, idle, write
//! stall). It is intrusive: a timer is named by the `u32` slot of its connection, and
//! the bucket lists are threaded through per-slot arrays that are sized once at
//! construction, so arming, re-arming and cancelling are O(1) and never allocate. It
//! holds only ticks and slot numbers: it must not read a clock, touch a descriptor or
//! know what a connection is; the core loop turns time into ticks and acts on what
//! expires.
//!
//! Memory: 16 bytes per entry (`next: u32`, `prev: u32`, `deadline: u64`, where
//! `u64::MAX` means disarmed) plus 4 bytes per bucket. One million slots cost 16 MB.

/// End of a list, and "no neighbour". Slot numbers are below `capacity <= u32::MAX`,
/// so no real slot can be mistaken for it.
const NIL: u32 = u32::MAX;

/// Deadline value that marks an entry as disarmed; it folds the armed flag into the
/// deadline so that an entry costs 16 bytes, not 24.
const DISARMED: u64 = u64::MAX;

/// The latest deadline that can be stored. A caller asking for `u64::MAX` gets this,
/// which at any realistic tick length is never.
const LATEST: u64 = u64::MAX - 1;

/// A hashed timing wheel over the entries `0..capacity`.
///
/// An entry with deadline `d > now` lives in bucket `d & mask`; one bucket holds every
/// lap, so `advance` checks each entry's own deadline and leaves later laps in place.
/// An entry scheduled at or before `now` goes to a separate overdue list (the last
/// head), which every `advance` drains first: that keeps "already due" timers from
/// waiting a whole lap, and keeps the invariant that entries in the buckets are due
/// strictly after `now`, which is how `cancel` finds an entry's list without storing it.
#[derive(Debug)]
pub struct TimerWheel {
    now: u64,
    /// `buckets - 1`; buckets is a power of two, so a tick's bucket is `tick & mask`.
    mask: u64,
    /// First entry of each bucket list, then the overdue list at index `buckets`.
    heads: Box<[u32]>,
    next: Box<[u32]>,
    prev: Box<[u32]>,
    deadline: Box<[u64]>,
    armed: usize,
}

impl TimerWheel {
    /// A wheel for entries `0..capacity` with `buckets` rounded up to a power of two
    /// (at least one). Choose buckets near the longest common timeout in ticks, so most
    /// entries are visited once, when they are due.
    ///
    /// Panics if `buckets` rounds up past `2^31`.
    pub fn new(capacity: u32, buckets: u32) -> TimerWheel {
        let buckets = buckets
            .max(1)
            .checked_next_power_of_two()
            .expect("timer wheel buckets must be at most 2^31");
        let n = capacity as usize;
        TimerWheel {
            now: 0,
            mask: u64::from(buckets - 1),
            heads: vec![NIL; buckets as usize + 1].into_boxed_slice(),
            next: vec![NIL; n].into_boxed_slice(),
            prev: vec![NIL; n].into_boxed_slice(),
            deadline: vec![DISARMED; n].into_boxed_slice(),
            armed: 0,
        }
    }

    /// The current tick: the last tick passed to `advance` (time never goes back).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of entries the wheel was built for.
    pub fn capacity(&self) -> u32 {
        // The arrays were built from a u32, so this cannot truncate.
        self.deadline.len() as u32
    }

    /// Number of buckets, after rounding up to a power of two.
    pub fn buckets(&self) -> u32 {
        // mask + 1 <= 2^31 by construction.
        (self.mask + 1) as u32
    }

    /// Arms `entry` to expire at `deadline_tick`, replacing any earlier deadline. A
    /// deadline at or before `now` expires at the next `advance`, whatever tick it is
    /// given. `u64::MAX` is stored as `u64::MAX - 1`.
    ///
    /// Panics if `entry >= capacity`.
    pub fn schedule(&mut self, entry: u32, deadline_tick: u64) {
        self.check_entry(entry);
        if self.is_armed(entry) {
            self.unlink(self.list_of(entry), entry);
        } else {
            self.armed += 1;
        }
        let deadline = deadline_tick.min(LATEST);
        self.deadline[entry as usize] = deadline;
        self.link(self.list_for(deadline), entry);
    }

    /// Disarms `entry`; returns whether it was armed.
    ///
    /// Panics if `entry >= capacity`.
    pub fn cancel(&mut self, entry: u32) -> bool {
        self.check_entry(entry);
        if !self.is_armed(entry) {
            return false;
        }
        self.unlink(self.list_of(entry), entry);
        self.deadline[entry as usize] = DISARMED;
        self.armed -= 1;
        true
    }

    /// Whether `entry` has a pending deadline.
    ///
    /// Panics if `entry >= capacity`.
    pub fn is_armed(&self, entry: u32) -> bool {
        self.deadline[entry as usize] != DISARMED
    }

    /// The pending deadline of `entry`, if armed.
    ///
    /// Panics if `entry >= capacity`.
    pub fn deadline(&self, entry: u32) -> Option<u64> {
        let d = self.deadline[entry as usize];
        (d != DISARMED).then_some(d)
    }

    /// Number of armed entries.
    pub fn len(&self) -> usize {
        self.armed
    }

    /// Whether no entry is armed.
    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Advances to `tick` (a tick at or before `now` moves nothing) and pushes every
    /// entry whose deadline is at or before the new `now` into `expired`, disarmed. The
    /// order of `expired` is not by deadline. Each bucket between the old and new `now`
    /// is visited once, and every bucket once if the jump is a full lap or more, so the
    /// cost is O(buckets visited + entries in them). `expired` is only appended to;
    /// reuse one with enough capacity to keep this free of allocation.
    pub fn advance(&mut self, tick: u64, expired: &mut Vec<u32>) {
        let target = tick.max(self.now);
        // Overdue entries are due by definition; draining them first also keeps them
        // from being mistaken for bucket entries once `now` moves.
        self.expire_list(self.overdue_list(), target, expired);
        let steps = (target - self.now).min(self.mask + 1);
        for step in 1..=steps {
            let bucket = (self.now.wrapping_add(step) & self.mask) as usize;
            self.expire_list(bucket, target, expired);
        }
        self.now = target;
    }

    /// Expires every entry of list `list` due at or before `target`; later laps stay.
    fn expire_list(&mut self, list: usize, target: u64, expired: &mut Vec<u32>) {
        let mut cur = self.heads[list];
        while cur != NIL {
            let after = self.next[cur as usize];
            if self.deadline[cur as usize] <= target {
                self.unlink(list, cur);
                self.deadline[cur as usize] = DISARMED;
                self.armed -= 1;
                expired.push(cur);
            }
            cur = after;
        }
    }

    fn overdue_list(&self) -> usize {
        self.heads.len() - 1
    }

    /// The list a deadline belongs in, given the current `now`.
    fn list_for(&self, deadline: u64) -> usize {
        if deadline <= self.now {
            self.overdue_list()
        } else {
            (deadline & self.mask) as usize
        }
    }

    /// The list an armed entry is on. Valid because `advance` removes every bucket
    /// entry due at or before the new `now`, so a deadline `<= now` means overdue.
    fn list_of(&self, entry: u32) -> usize {
        self.list_for(self.deadline[entry as usize])
    }

    fn link(&mut self, list: usize, entry: u32) {
        let head = self.heads[list];
        self.prev[entry as usize] = NIL;
        self.next[entry as usize] = head;
        if head != NIL {
            self.prev[head as usize] = entry;
        }
        self.heads[list] = entry;
    }

    fn unlink(&mut self, list: usize, entry: u32) {
        let (p, n) = (self.prev[entry as usize], self.next[entry as usize]);
        if p == NIL {
            debug_assert_eq!(
                self.heads[list], entry,
                "entry {entry} is not on list {list}"
            );
            self.heads[list] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.prev[entry as usize] = NIL;
        self.next[entry as usize] = NIL;
    }

    #[track_caller]
    fn check_entry(&self, entry: u32) {
        assert!(
            (entry as usize) < self.deadline.len(),
            "timer entry {entry} out of range (capacity {})",
            self.deadline.len()
        );
    }

    /// Walks every list and checks links, placement and the armed count.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut seen = 0usize;
        for list in 0..self.heads.len() {
            let mut prev = NIL;
            let mut cur = self.heads[list];
            while cur != NIL {
                let d = self.deadline[cur as usize];
                assert_ne!(d, DISARMED, "disarmed entry {cur} on list {list}");
                assert_eq!(self.prev[cur as usize], prev, "bad prev link at {cur}");
                assert_eq!(self.list_of(cur), list, "entry {cur} on wrong list");
                seen += 1;
                assert!(seen <= self.deadline.len(), "cycle in list {list}");
                prev = cur;
                cur = self.next[cur as usize];
            }
        }
        assert_eq!(seen, self.armed, "armed count disagrees with lists");
        let armed = self.deadline.iter().filter(|&&d| d != DISARMED).count();
        assert_eq!(armed, self.armed, "armed count disagrees with deadlines");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Schedule(u32, u64),
        Cancel(u32),
        Advance(u64),
    }
    use Op::*;

    /// Applies `ops` to a wheel and returns what each `Advance` expired (sorted).
    fn run(capacity: u32, buckets: u32, ops: &[Op]) -> Vec<Vec<u32>> {
        let mut w = TimerWheel::new(capacity, buckets);
        let mut out = Vec::new();
        for &op in ops {
            match op {
                Schedule(e, d) => w.schedule(e, d),
                Cancel(e) => {
                    w.cancel(e);
                }
                Advance(t) => {
                    let mut v = Vec::new();
                    w.advance(t, &mut v);
                    out.push(sorted(v));
                }
            }
            w.check_invariants();
        }
        out
    }

    /// (name, buckets, operations, what each advance expires, sorted).
    type Case = (&'static str, u32, &'static [Op], &'static [&'static [u32]]);

    #[test]
    fn table() {
        let cases: &[Case] = &[
            (
                "fires exactly on its tick",
                4,
                &[Schedule(0, 3), Advance(2), Advance(3)],
                &[&[], &[0]],
            ),
            (
                "later lap stays in its bucket",
                4,
                &[
                    Schedule(0, 9),
                    Advance(1),
                    Advance(5),
                    Advance(8),
                    Advance(9),
                ],
                &[&[], &[], &[], &[0]],
            ),
            (
                "reschedule replaces deadline",
                8,
                &[Schedule(1, 2), Schedule(1, 6), Advance(5), Advance(6)],
                &[&[], &[1]],
            ),
            (
                "reschedule earlier",
                8,
                &[Schedule(1, 6), Schedule(1, 2), Advance(2), Advance(6)],
                &[&[1], &[]],
            ),
            (
                "cancel keeps it quiet",
                8,
                &[Schedule(2, 1), Cancel(2), Advance(100)],
                &[&[]],
            ),
            (
                "deadline at now fires on a zero advance",
                8,
                &[Advance(10), Schedule(3, 10), Schedule(4, 5), Advance(10)],
                &[&[], &[3, 4]],
            ),
            (
                "time never goes back",
                8,
                &[Advance(10), Schedule(0, 11), Advance(3), Advance(11)],
                &[&[], &[], &[0]],
            ),
            (
                "jump over many laps",
                2,
                &[
                    Schedule(0, 1),
                    Schedule(1, 2),
                    Schedule(2, 1000),
                    Schedule(3, 1001),
                    Advance(1000),
                ],
                &[&[0, 1, 2]],
            ),
            (
                "one bucket",
                1,
                &[Schedule(0, 5), Schedule(1, 2), Advance(3), Advance(5)],
                &[&[1], &[0]],
            ),
            (
                "never",
                4,
                &[Schedule(0, u64::MAX), Advance(u64::MAX - 2)],
                &[&[]],
            ),
            (
                "end of time",
                4,
                &[Schedule(0, u64::MAX), Schedule(1, 7), Advance(u64::MAX)],
                &[&[0, 1]],
            ),
        ];
        for (name, buckets, ops, want) in cases {
            assert_eq!(run(8, *buckets, ops), *want, "case: {name}");
        }
    }

    #[test]
    fn accessors_and_edges() {
        let mut w = TimerWheel::new(3, 5);
        assert_eq!((w.capacity(), w.buckets()), (3, 8));
        assert_eq!(TimerWheel::new(0, 0).buckets(), 1);
        assert!(w.is_empty() && !w.is_armed(2) && w.deadline(2).is_none());
        w.schedule(2, 40);
        assert!(w.is_armed(2) && w.len() == 1 && w.deadline(2) == Some(40));
        w.schedule(2, 41);
        assert_eq!((w.len(), w.deadline(2)), (1, Some(41)));
        assert!(w.cancel(2) && !w.cancel(2) && w.is_empty());
        w.schedule(0, u64::MAX);
        assert_eq!(w.deadline(0), Some(u64::MAX - 1));
        let mut v = Vec::new();
        w.advance(u64::MAX, &mut v);
        assert_eq!((v, w.now()), (vec![0], u64::MAX));
        // At the end of time everything is overdue and still fires.
        w.schedule(1, 3);
        let mut v = Vec::new();
        w.advance(u64::MAX, &mut v);
        assert_eq!(v, vec![1]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn entry_past_capacity_panics() {
        TimerWheel::new(3, 4).schedule(3, 1);
    }

    #[test]
    fn empty_wheel() {
        let mut w = TimerWheel::new(0, 16);
        let mut v = Vec::new();
        w.advance(1 << 40, &mut v);
        assert!(v.is_empty() && w.is_empty() && w.now() == 1 << 40);
    }

    #[test]
    fn full_capacity() {
        // Every slot armed at once, the last one included, then expired in one jump.
        let cap = 1_000u32;
        let mut w = TimerWheel::new(cap, 8);
        for e in 0..cap {
            w.schedule(e, u64::from(e) * 7);
        }
        assert_eq!(w.len(), cap as usize);
        w.check_invariants();
        let mut v = Vec::new();
        w.advance(7 * u64::from(cap), &mut v);
        assert_eq!(sorted(v), (0..cap).collect::<Vec<_>>());
        assert!(w.is_empty());
    }

    #[test]
    fn many_entries_spread_over_laps() {
        let (cap, buckets) = (10_000u32, 64u32);
        let mut w = TimerWheel::new(cap, buckets);
        for e in 0..cap {
            w.schedule(e, u64::from(e % 1_000) + 1);
        }
        let mut v = Vec::with_capacity(cap as usize);
        for t in 1..=1_000u64 {
            v.clear();
            w.advance(t, &mut v);
            assert_eq!(v.len(), 10, "tick {t}");
            assert!(v.iter().all(|&e| u64::from(e % 1_000) + 1 == t));
        }
        assert!(w.is_empty());
        w.check_invariants();
    }

    /// The reference: a map of armed entries to deadlines and a clock.
    #[derive(Default)]
    struct Model {
        now: u64,
        armed: BTreeMap<u32, u64>,
    }

    impl Model {
        fn advance(&mut self, tick: u64) -> Vec<u32> {
            self.now = self.now.max(tick);
            let now = self.now;
            let due: Vec<u32> = self
                .armed
                .iter()
                .filter(|(_, &d)| d <= now)
                .map(|(&e, _)| e)
                .collect();
            for e in &due {
                self.armed.remove(e);
            }
            due
        }
    }

    fn op(capacity: u32) -> impl Strategy<Value = (u8, u32, u64)> {
        // (kind, entry, amount): amounts span many laps of the largest wheel tested.
        (
            0u8..10,
            0..capacity,
            prop_oneof![0u64..8, 0u64..200, Just(u64::MAX)],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_reference_model(
            capacity in 1u32..24,
            bucket_bits in 0u32..5,
            ops in prop::collection::vec(op(24), 1..300),
        ) {
            let mut w = TimerWheel::new(capacity, 1 << bucket_bits);
            let mut m = Model::default();
            let mut expired = Vec::new();
            for (kind, entry, amount) in ops {
                let entry = entry % capacity;
                match kind {
                    // Deadlines relative to now, some in the past.
                    0..=4 => {
                        let d = if amount == u64::MAX { u64::MAX } else { (w.now() + amount).saturating_sub(3) };
                        w.schedule(entry, d);
                        m.armed.insert(entry, d.min(LATEST));
                    }
                    5 => prop_assert_eq!(w.cancel(entry), m.armed.remove(&entry).is_some()),
                    _ => {
                        // Mostly small steps, sometimes backwards, sometimes a big jump.
                        let tick = if amount == u64::MAX { w.now() + 1_000 } else { (w.now() + amount).saturating_sub(2) };
                        expired.clear();
                        w.advance(tick, &mut expired);
                        prop_assert_eq!(sorted(expired.clone()), m.advance(tick));
                    }
                }
                w.check_invariants();
                prop_assert_eq!(w.now(), m.now);
                prop_assert_eq!(w.len(), m.armed.len());
                prop_assert_eq!(w.is_empty(), m.armed.is_empty());
                for e in 0..capacity {
                    prop_assert_eq!(w.deadline(e), m.armed.get(&e).copied());
                    prop_assert_eq!(w.is_armed(e), m.armed.contains_key(&e));
                }
            }
        }
    }
}
