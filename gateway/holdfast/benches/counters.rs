//! What counting costs the data path: the time of one per-core counter increment
//! (`CoreMetrics::inc`, a relaxed load and store on the core's own cache-line-aligned
//! block) against the same loop without it, and the same for a locked `fetch_add` for
//! comparison. Run with `cargo bench -p holdfast --bench counters`; it prints nanoseconds
//! per increment (best of several rounds, so a noisy machine shows its quiet moments) and
//! the share of a relayed frame's CPU budget that the counters of one frame take.

use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use holdfast::metrics::CoreMetrics;

const N: u64 = 50_000_000;
const ROUNDS: usize = 7;
/// Counter updates on the path of one echoed frame (frames and bytes from the client, the
/// worker link's frame count, frames and bytes to the client).
const INCREMENTS_PER_FRAME: f64 = 5.0;
/// The design's CPU budget per relayed 64-byte frame.
const FRAME_BUDGET_NS: f64 = 4000.0;

fn best_ns_per_iter(mut body: impl FnMut(u64)) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for i in 0..N {
                body(black_box(i));
            }
            t.elapsed().as_nanos() as f64 / N as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let m = Box::new(CoreMetrics::default());
    let empty = best_ns_per_iter(|i| {
        black_box(i);
    });
    let single_writer = best_ns_per_iter(|i| {
        black_box(i);
        CoreMetrics::inc(&m.frames_from_client);
    });
    let locked = best_ns_per_iter(|i| {
        black_box(i);
        m.frames_to_client.fetch_add(1, Relaxed);
    });
    let inc = (single_writer - empty).max(0.0);
    let lock = (locked - empty).max(0.0);
    println!("empty loop:                 {empty:.3} ns/iter");
    println!("CoreMetrics::inc (ours):    {inc:.3} ns/increment");
    println!("fetch_add (for comparison): {lock:.3} ns/increment");
    let share = INCREMENTS_PER_FRAME * inc / FRAME_BUDGET_NS * 100.0;
    println!(
        "counting per relayed frame: {:.1} ns = {share:.3}% of a {FRAME_BUDGET_NS} ns frame budget",
        INCREMENTS_PER_FRAME * inc
    );
    assert!(m.frames_from_client.load(Relaxed) > 0 && m.frames_to_client.load(Relaxed) > 0);
}
