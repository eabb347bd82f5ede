//! Rendezvous (highest random weight) hashing of a connection id over the live
//! workers. Each worker gets a weight per connection and the heaviest live one wins, so
//! when a worker dies only its own connections move, and when it comes back they return
//! to it. The weights come from a fixed 64-bit mixer, never a per-process random state,
//! so every core, every gateway process and every restart agree on where a connection
//! goes. It must not allocate, keep state or know how workers are reached.

/// The splitmix64 finaliser: a fixed bijection with full avalanche, so ids that differ
/// only in low slot bits still land on unrelated weights.
const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A per-worker constant, so each worker ranks connections in its own order.
const fn worker_seed(worker: u16) -> u64 {
    mix((worker as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Seeds of workers 0..64, precomputed for `pick_mask`.
const MASK_SEEDS: [u64; 64] = {
    let mut seeds = [0u64; 64];
    let mut i = 0;
    while i < 64 {
        seeds[i] = worker_seed(i as u16);
        i += 1;
    }
    seeds
};

/// Weight of a worker for a connection whose id has been mixed once. The id is mixed
/// before the seed is applied so that structure in ids (core, generation, slot) cannot
/// line up with structure in seeds.
#[inline]
fn weight(mixed_conn: u64, seed: u64) -> u64 {
    mix(mixed_conn ^ seed)
}

/// Picks the live worker with the highest weight for `conn`; `None` if none is live.
/// Deterministic across processes and runs; the order of `live` and repeats in it do
/// not change the answer (ties, which need a 64-bit collision, go to the higher index).
pub fn pick(conn: u64, live: impl IntoIterator<Item = u16>) -> Option<u16> {
    let m = mix(conn);
    live.into_iter()
        .map(|w| (weight(m, worker_seed(w)), w))
        .max()
        .map(|(_, w)| w)
}

/// Same as [`pick`], over a bitmask of live workers (bit `i` set: worker `i` live), for
/// up to 64 workers.
pub fn pick_mask(conn: u64, live_mask: u64) -> Option<u16> {
    let m = mix(conn);
    let mut best: Option<(u64, u16)> = None;
    let mut rest = live_mask;
    while rest != 0 {
        let w = rest.trailing_zeros() as u16;
        rest &= rest - 1;
        let cand = (weight(m, MASK_SEEDS[w as usize]), w);
        if best.is_none_or(|b| cand > b) {
            best = Some(cand);
        }
    }
    best.map(|(_, w)| w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Connection ids as the gateway builds them: core | generation | slot.
    fn conn_id(core: u64, generation: u64, slot: u64) -> u64 {
        core << 56 | generation << 32 | slot
    }

    fn ids(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|slot| conn_id(3, 17, slot))
    }

    fn workers(mask: u64) -> impl DoubleEndedIterator<Item = u16> {
        (0..64u16).filter(move |&w| mask >> w & 1 == 1)
    }

    #[test]
    fn none_without_live_workers() {
        assert_eq!(pick(42, []), None);
        assert_eq!(pick_mask(42, 0), None);
        assert_eq!(pick(42, [5]), Some(5));
        assert_eq!(pick_mask(42, 1 << 63), Some(63));
    }

    #[test]
    fn seeds_table_matches_seed_function() {
        for w in 0..64u16 {
            assert_eq!(MASK_SEEDS[w as usize], worker_seed(w));
        }
    }

    #[test]
    fn golden_values_never_change() {
        // Assignments must agree across versions of the gateway running side by side;
        // a change here reroutes live connections on upgrade.
        let cases: &[(u64, u64, Option<u16>)] = &[
            (0, 0xff, Some(1)),
            (conn_id(0, 1, 0), 0xff, Some(3)),
            (conn_id(7, 3, 12345), 0x0f, Some(1)),
            (u64::MAX, u64::MAX, Some(9)),
        ];
        for &(conn, mask, want) in cases {
            assert_eq!(pick_mask(conn, mask), want, "conn {conn:#x} mask {mask:#x}");
            assert_eq!(
                pick(conn, workers(mask)),
                want,
                "conn {conn:#x} mask {mask:#x}"
            );
        }
    }

    #[test]
    fn removal_moves_only_the_removed_workers_connections() {
        let all = 0xffu64;
        let mut moved_to = [0u32; 8];
        for dead in 0..8u16 {
            let alive = all & !(1 << dead);
            for id in ids(100_000) {
                let before = pick_mask(id, all).unwrap();
                let after = pick_mask(id, alive).unwrap();
                if before == dead {
                    assert_ne!(after, dead);
                    if dead == 0 {
                        moved_to[after as usize] += 1;
                    }
                } else {
                    assert_eq!(before, after, "id {id:#x} moved off live worker {before}");
                }
                // Bringing the worker back restores the old assignment.
                assert_eq!(pick_mask(id, alive | 1 << dead), Some(before));
            }
        }
        // Worker 0's connections spread evenly over the seven survivors.
        let total: u32 = moved_to.iter().sum();
        for (w, &n) in moved_to.iter().enumerate().skip(1) {
            let share = f64::from(n) / f64::from(total);
            assert!(
                (share - 1.0 / 7.0).abs() < 0.02,
                "worker {w} took {share:.3}"
            );
        }
    }

    #[test]
    fn sequential_slots_balance() {
        for (n_workers, cores) in [(4u16, [0u64, 1, 200]), (8, [0, 5, 255])] {
            let mask = (1u64 << n_workers) - 1;
            for core in cores {
                let mut counts = vec![0u32; n_workers as usize];
                for slot in 0..100_000u64 {
                    counts[pick_mask(conn_id(core, 1, slot), mask).unwrap() as usize] += 1;
                }
                let fair = 100_000.0 / f64::from(n_workers);
                for (w, &c) in counts.iter().enumerate() {
                    let off = (f64::from(c) - fair).abs() / fair;
                    assert!(
                        off < 0.03,
                        "{n_workers} workers, core {core}: worker {w} has {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn sparse_worker_indices_work_with_pick() {
        // `pick` takes indices past 64 too; balance holds there as well.
        let live = [3u16, 100, 4000, 65535];
        let mut counts = [0u32; 4];
        for id in ids(40_000) {
            let w = pick(id, live).unwrap();
            counts[live.iter().position(|&l| l == w).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_400..10_600).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn both_functions_agree(conn in any::<u64>(), mask in any::<u64>(), sparse in any::<bool>()) {
            // Half the cases use few live workers, where ties between orders would show.
            let mask = if sparse { mask & mask.rotate_left(17) & mask.rotate_left(41) } else { mask };
            let forward = pick(conn, workers(mask));
            prop_assert_eq!(forward, pick_mask(conn, mask));
            let backward: Vec<u16> = workers(mask).rev().chain(workers(mask)).collect();
            prop_assert_eq!(forward, pick(conn, backward));
            prop_assert_eq!(forward.is_none(), mask == 0);
            if let Some(w) = forward {
                prop_assert!(mask >> w & 1 == 1);
            }
        }
    }
}
