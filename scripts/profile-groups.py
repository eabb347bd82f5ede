#!/usr/bin/env python3
"""Turns a `perf report --sort dso,sym -g none` listing of the gateway into a breakdown
per operation: userspace against kernel, by group and by function, in microseconds.

    profile-groups.py REPORT SCENARIO US_PER_OP USER_US_PER_OP TOP [UTILIZATION]

US_PER_OP is the scenario's measured server CPU per operation (the load generator's
report); each group's figure is that times its share of the samples. The groups are
matched on symbol names, first match wins (see GROUPS). Used by scripts/profile.sh.
"""

import re
import sys

# (group, kernel?, pattern on the symbol or the dso). Order matters: first match wins.
GROUPS = [
    ("crypto (aws-lc / ring)", False,
     r"aws_lc|aws-lc|ring_core|x25519|X25519|p256|nistz256|ecdsa|ECDSA|sha256|sha512|SHA256|"
     r"SHA512|aes|AES|gcm|GCM|gfmul|ghash|chacha|ChaCha|poly1305|bn_|BN_|ec_|EC_|fiat_|"
     r"EVP_|HMAC|HKDF|hkdf|CRYPTO_|OPENSSL_|mlkem|MLKEM|kyber|keccak|KECCAK|RAND_|rand_bytes"),
    ("rustls (handshake, records)", False, r"rustls|webpki"),
    ("allocator", False, r"^(malloc|free|realloc|calloc|cfree|__libc_malloc|__libc_free|"
     r"_int_malloc|_int_free|_int_realloc|malloc_consolidate|tcache|__rust_alloc|"
     r"__rust_dealloc|__rust_realloc|alloc::alloc|unlink_chunk|sysmalloc)"),
    ("memcpy / memset", False, r"memcpy|memmove|memset|__memcmp|memcmp|bcmp"),
    ("holdfast (session, core, codecs)", False, r"holdfast"),
    ("io-uring crate", False, r"io_uring::"),
    ("other userspace", False, r"."),
    ("kernel: io_uring", True, r"io_uring|^io_|^__io_|io_wq|io_worker"),
    ("kernel: unix sockets", True, r"unix_"),
    ("kernel: TCP/IP, loopback", True,
     r"tcp|^ip_|^__ip|inet|^sk_|^__sk|skb|sock|netif|net_rx|__napi|napi|loopback|^dev_|"
     r"^__dev|^nf_|csum|^__netif|^rps|neigh|^ipv4|^raw_|^udp|process_backlog|do_softirq|"
     r"__do_softirq|net_"),
    ("kernel: scheduler, wake-ups, idle", True,
     r"schedule|try_to_wake|ttwu|enqueue|dequeue|pick_next|finish_task_switch|update_curr|"
     r"select_task_rq|wake_|psi_|update_load|update_cfs|reweight|cpuidle|do_idle|"
     r"default_idle|pv_|hrtimer|tick_|sched|task_|__switch_to|switch_mm|cpuacct|"
     r"native_safe_halt|raw_spin|_raw_|queued_spin|rcu"),
    ("kernel: memory (slab, pages)", True,
     r"kmem|kmalloc|kfree|slab|__slab|page|alloc_pages|memcg|mem_cgroup|__free|mm_|"
     r"folio|vm_|lru"),
    ("kernel: files, descriptors, security", True,
     r"fd_install|fput|__fput|alloc_file|filp|d_alloc|dput|inode|security_|apparmor|"
     r"alloc_fd|close_fd|file_|fdget|task_work|__fsnotify|fsnotify|d_instantiate"),
    ("kernel: syscall entry and exit", True,
     r"entry_SYSCALL|syscall|__x64_sys|exit_to_user|srso|retbleed|__rseq|rseq|"
     r"irqentry|native_irq|asm_|error_entry|restore_regs|clear_bhb|x64_sys_call"),
    ("kernel: other", True, r"."),
]

LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+\[([k.])\]\s+(.*?)\s*$")


def main():
    report, scenario, us, user_us, top = sys.argv[1:6]
    busy = sys.argv[6] if len(sys.argv) > 6 else ""
    us = None if us == "null" else float(us)
    user_us = None if user_us == "null" else float(user_us)
    top = int(top)
    rows = []
    for line in open(report, encoding="utf-8", errors="replace"):
        m = LINE.match(line)
        if m:
            pct, dso, kind, sym = m.groups()
            rows.append((float(pct), dso, kind == "k", sym))
    total = sum(r[0] for r in rows) or 1.0
    groups = {}
    for pct, dso, kernel, sym in rows:
        for name, g_kernel, pattern in GROUPS:
            if g_kernel == kernel and (re.search(pattern, sym) or re.search(pattern, dso)):
                groups[name] = groups.get(name, 0.0) + pct
                break

    def per_op(share):
        return "" if us is None else f"{us * share / total:.2f}"

    user = sum(r[0] for r in rows if not r[2])
    print(f"\n### {scenario}\n")
    head = f"server CPU per operation {us:.2f} us" if us is not None else "no operation completed"
    if user_us is not None:
        head += f" ({user_us:.2f} us userspace by /proc; {100 * user / total:.0f} % of the samples)"
    if busy:
        head += f"; the gateway's core was {float(busy) * 100:.0f} % busy"
    print(head + "\n")
    print("| group | share | us per operation |")
    print("|---|---|---|")
    for name, g_kernel, _ in GROUPS:
        if name in groups:
            print(f"| {name} | {100 * groups[name] / total:.1f} % | {per_op(groups[name])} |")
    print(f"\nTop {top} functions (self time):\n")
    print("| function | where | share | us per operation |")
    print("|---|---|---|---|")
    for pct, dso, kernel, sym in sorted(rows, key=lambda r: -r[0])[:top]:
        where = "kernel" if kernel else dso
        sym = sym.replace("|", "\\|")
        if len(sym) > 90:
            sym = sym[:87] + "..."
        print(f"| `{sym}` | {where} | {100 * pct / total:.1f} % | {per_op(pct)} |")


if __name__ == "__main__":
    main()
