//! Host checks behind `holdfast check`: does this machine let the gateway hold
//! `conns_per_core × cores` connections, and is the kernel-tuning profile in force?
//!
//! The profile is the same sysctl.d-style file that `kernel-tuning/holdfast-tune` applies
//! and verifies (`kernel-tuning/profiles/gateway.conf`, embedded here as
//! [`GATEWAY_PROFILE`]), parsed by the same rules, so the script and the gateway can never
//! disagree about what "tuned" means. Every [`Finding`] names what to run or set to fix it.
//!
//! What is read, all of it plain files (no syscalls, no `unsafe`):
//! - `<sysctl_root>/...`: one file per profile key, plus `fs/nr_open`, `fs/file-max` and
//!   `kernel/io_uring_disabled`;
//! - `<sysctl_root>/../self/limits` and `<sysctl_root>/../meminfo`: with the normal root
//!   `/proc/sys` these are `/proc/self/limits` (the open-file limit of the process running
//!   the check; run it the way the gateway runs) and `/proc/meminfo`.
//!
//! Tests point `sysctl_root` at a fake `proc/sys` tree in a temporary directory.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::Path;

/// The gateway profile shipped with the kernel-tuning kit, so an installed binary can check
/// a host without the kit beside it.
pub const GATEWAY_PROFILE: &str = include_str!("../../../kernel-tuning/profiles/gateway.conf");

/// Keys that are limits: a host value at or above the profile's is in force. The same list
/// as `CAPACITY_KEYS` in `kernel-tuning/holdfast-tune`.
pub const CAPACITY_KEYS: &[&str] = &[
    "fs.nr_open",
    "fs.file-max",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_max_orphans",
    "net.ipv4.tcp_max_tw_buckets",
    "net.netfilter.nf_conntrack_max",
    "net.core.rps_sock_flow_entries",
    "vm.max_map_count",
];

/// Descriptors asked for beyond one core's connections: listeners, worker links and the
/// admin port live in the regular fd table, which shares the limit with client sockets
/// in the regular-fd fallback. (With direct descriptors each ring's fixed-file table is
/// separate and takes up to the whole soft limit.)
pub const FD_HEADROOM: u64 = 64;

/// Memory estimate per connection in user space (rustls session, tables), bytes.
pub const USER_BYTES_PER_CONN: u64 = 4096;

/// Memory estimate per connection in the kernel (TCP socket, inode, dentry, file), bytes.
pub const KERNEL_BYTES_PER_CONN: u64 = 4096;

/// One line of the check: what was looked at, what the host has, what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. `net.core.somaxconn` or `open files (soft)`.
    pub item: String,
    /// The host's value as found.
    pub have: String,
    /// What the gateway needs (`>= N` for limits).
    pub want: String,
    /// Whether the host satisfies it.
    pub ok: bool,
    /// The command or setting that fixes it.
    pub fix: String,
}

/// Parses a sysctl.d-style profile (the same file the scripts use).
///
/// Rules (identical to `parse_sysctl_file` in `kernel-tuning/holdfast-tune`): blank lines
/// and lines starting with `#` or `;` are ignored; every other line is `key = value`,
/// split at the first `=`; the value's fields are joined by single spaces (`"4096\t16384"`
/// becomes `"4096 16384"`). A key may be written `-key`, sysctl.d's "ignore if absent";
/// the returned key keeps that `-` so [`check_host`] treats it as optional. Keys use
/// `[A-Za-z0-9_.:/-]` and must not contain `..` or `//`. An empty value, a duplicate key
/// (with or without `-`) or a profile without settings is an error naming the line.
pub fn parse_profile(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let n = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((raw_key, raw_value)) = line.split_once('=') else {
            return Err(format!("line {n}: expected 'key = value', got: {line}"));
        };
        let key = raw_key.trim();
        let bare = key.strip_prefix('-').unwrap_or(key);
        if !valid_key(bare) {
            return Err(format!("line {n}: invalid key '{bare}'"));
        }
        let value = normalize(raw_value);
        if value.is_empty() {
            return Err(format!("line {n}: empty value for {bare}"));
        }
        if let Some(first) = seen.get(bare) {
            return Err(format!(
                "line {n}: duplicate key {bare} (first on line {first})"
            ));
        }
        seen.insert(bare.to_string(), n);
        out.push((key.to_string(), value));
    }
    if out.is_empty() {
        return Err("no settings in the profile".to_string());
    }
    Ok(out)
}

/// Compares the host with what `conns_per_core * cores` connections need.
///
/// Findings, in order: the soft and hard `RLIMIT_NOFILE` against one core's fixed-file
/// table (`conns_per_core + 64`; the gateway raises soft to hard at start, so a low soft
/// limit under a sufficient hard one is fine), `fs.nr_open` (the ceiling for the hard
/// limit), `fs.file-max` (every connection is an open file, direct descriptor or not),
/// memory (`MemAvailable` against an estimate of 4 KiB user + 4 KiB kernel per
/// connection), io_uring (`kernel.io_uring_disabled` must be 0 where the kernel has it),
/// then every profile key, read under `sysctl_root`. Multi-value keys compare field by
/// field; for the [`CAPACITY_KEYS`] a higher host value is in force; a `-key` absent from
/// the kernel is fine.
pub fn check_host(
    sysctl_root: &Path,
    profile: &[(String, String)],
    cores: usize,
    conns_per_core: u64,
) -> Vec<Finding> {
    let proc_root = sysctl_root.parent().unwrap_or_else(|| Path::new("/proc"));
    let per_core = conns_per_core.saturating_add(FD_HEADROOM);
    let total = conns_per_core.saturating_mul(cores as u64);
    let limit_hint = per_core.checked_next_power_of_two().unwrap_or(per_core);
    let mut out = Vec::new();

    // Open-file limits: each ring's fixed-file table is sized by the soft limit.
    let limits_fix = format!(
        "LimitNOFILE={limit_hint} in holdfast.service, nofile in limits.d/holdfast.conf, \
         or `ulimit -n {limit_hint}` before starting"
    );
    let want_fds = format!(">= {per_core} ({conns_per_core} per core + {FD_HEADROOM})");
    match nofile_limits(&proc_root.join("self/limits")) {
        Ok((soft, hard)) => {
            let have = if soft < per_core && hard >= per_core {
                format!(
                    "{} (raised to the hard limit {} at start)",
                    show_limit(soft),
                    show_limit(hard)
                )
            } else {
                show_limit(soft)
            };
            out.push(finding(
                "open files, soft (per-core table)",
                have,
                want_fds.clone(),
                soft >= per_core || hard >= per_core,
                &limits_fix,
            ));
            out.push(finding(
                "open files, hard",
                show_limit(hard),
                want_fds,
                hard >= per_core,
                &limits_fix,
            ));
        }
        Err(e) => {
            for item in ["open files, soft (per-core table)", "open files, hard"] {
                out.push(finding(
                    item,
                    e.clone(),
                    want_fds.clone(),
                    false,
                    &limits_fix,
                ));
            }
        }
    }

    // fs.nr_open bounds the hard limit; fs.file-max bounds all open files on the box.
    out.push(at_least(
        sysctl_root,
        "fs.nr_open",
        "fs.nr_open (per-core table)",
        per_core,
        &format!(
            "holdfast-tune apply gateway, or sysctl -w fs.nr_open={}",
            limit_hint.max(1 << 20)
        ),
    ));
    out.push(at_least(
        sysctl_root,
        "fs.file-max",
        "fs.file-max (all connections)",
        total,
        &format!(
            "holdfast-tune apply gateway, or sysctl -w fs.file-max={}",
            total.saturating_add(total / 4).max(1 << 20)
        ),
    ));

    // Memory.
    let need = total.saturating_mul(USER_BYTES_PER_CONN + KERNEL_BYTES_PER_CONN);
    let want_mem = format!(
        ">= {} ({total} conns x (4 KiB user + 4 KiB kernel), an estimate)",
        show_bytes(need)
    );
    let mem_fix = "fewer connections (limits.max_conns_per_core, --cores) or more RAM";
    match mem_available(&proc_root.join("meminfo")) {
        Ok(avail) => out.push(finding(
            "memory (MemAvailable)",
            show_bytes(avail),
            want_mem,
            avail >= need,
            mem_fix,
        )),
        Err(e) => out.push(finding(
            "memory (MemAvailable)",
            e,
            want_mem,
            false,
            mem_fix,
        )),
    }

    // io_uring.
    let io_fix = "sysctl -w kernel.io_uring_disabled=0 (1 allows only kernel.io_uring_group)";
    out.push(
        match read_value(&sysctl_root.join("kernel/io_uring_disabled")) {
            Ok(v) => {
                let ok = v == "0";
                finding("kernel.io_uring_disabled", v, "0".into(), ok, io_fix)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => finding(
                "kernel.io_uring_disabled",
                "absent (kernel before 6.6: io_uring on)".into(),
                "0".into(),
                true,
                io_fix,
            ),
            Err(e) => finding(
                "kernel.io_uring_disabled",
                format!("unreadable: {e}"),
                "0".into(),
                false,
                io_fix,
            ),
        },
    );

    // The profile.
    for (raw_key, want) in profile {
        let optional = raw_key.starts_with('-');
        let key = raw_key.trim_start_matches('-');
        let capacity = CAPACITY_KEYS.contains(&key);
        let want_text = if capacity {
            format!(">= {want}")
        } else {
            want.clone()
        };
        let fix = if want.contains(' ') {
            format!("holdfast-tune apply gateway, or sysctl -w {key}=\"{want}\"")
        } else {
            format!("holdfast-tune apply gateway, or sysctl -w {key}={want}")
        };
        let f = match read_value(&sysctl_root.join(key_path(key))) {
            Ok(have) => {
                let ok = value_ok(capacity, &have, want);
                finding(key, have, want_text, ok, &fix)
            }
            Err(e) if e.kind() == ErrorKind::NotFound && optional => {
                finding(key, "absent (optional)".into(), want_text, true, &fix)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => finding(
                key,
                "absent".into(),
                want_text,
                false,
                "this kernel lacks the key: check the kernel version or load the module",
            ),
            Err(e) => finding(key, format!("unreadable: {e}"), want_text, false, &fix),
        };
        out.push(f);
    }
    out
}

/// Renders findings as an aligned text table (item | have | want | status | fix; the fix
/// is shown where the status is `FIX`), followed by a one-line summary.
pub fn render_table(findings: &[Finding]) -> String {
    let header = ["item", "have", "want", "status", "fix"];
    let rows: Vec<[String; 5]> = findings
        .iter()
        .map(|f| {
            [
                f.item.clone(),
                f.have.clone(),
                f.want.clone(),
                if f.ok { "ok" } else { "FIX" }.to_string(),
                if f.ok { "-".to_string() } else { f.fix.clone() },
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String; 5]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i] - cell.chars().count();
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for row in &rows {
        line(row);
    }
    let bad = findings.iter().filter(|f| !f.ok).count();
    if bad == 0 {
        let _ = writeln!(out, "all {} checks ok", findings.len());
    } else {
        let _ = writeln!(out, "{bad} of {} checks need a fix", findings.len());
    }
    out
}

/// What `holdfast run` logs at start from the host check (`holdfast check` prints the whole
/// table): a line of its own, with its fix, for each finding that caps the configured
/// tables or can stop the gateway (open-file limits, fs.nr_open, fs.file-max, memory,
/// io_uring), and one line summing up the tuning-profile settings that differ.
pub fn startup_warnings(findings: &[Finding], profile: &[(String, String)]) -> Vec<String> {
    let in_profile = |item: &str| {
        profile
            .iter()
            .any(|(k, _)| k.trim_start_matches('-') == item)
    };
    let mut out = Vec::new();
    let soft = findings
        .iter()
        .find(|f| f.item == "open files, soft (per-core table)");
    let hard = findings.iter().find(|f| f.item == "open files, hard");
    if let Some(soft) = soft.filter(|f| !f.ok) {
        let hard = hard.map_or("unknown".to_string(), |h| h.have.clone());
        out.push(format!(
            "open-file limit too low for the configured tables: soft {}, hard {hard}, and \
             each core's connection table wants {}; the tables are capped at the limit, so \
             this gateway holds fewer connections than limits.max_conns_per_core; fix: {}",
            soft.have, soft.want, soft.fix
        ));
    } else if let Some(hard) = hard.filter(|f| !f.ok) {
        out.push(format!(
            "hard open-file limit {} is below one core's table ({}); fix: {}",
            hard.have, hard.want, hard.fix
        ));
    }
    let mut differ = Vec::new();
    for f in findings.iter().filter(|f| !f.ok) {
        if f.item.starts_with("open files") {
            continue;
        }
        if in_profile(&f.item) {
            differ.push(f.item.as_str());
        } else {
            out.push(format!(
                "host check: {} is {} (want {}); fix: {}",
                f.item, f.have, f.want, f.fix
            ));
        }
    }
    if !differ.is_empty() {
        let shown: Vec<&str> = differ.iter().copied().take(3).collect();
        let more = if differ.len() > shown.len() {
            ", ..."
        } else {
            ""
        };
        out.push(format!(
            "{} kernel setting(s) differ from the gateway tuning profile ({}{more}); fix: \
             holdfast-tune apply gateway (`holdfast check` lists each with its value)",
            differ.len(),
            shown.join(", ")
        ));
    }
    out
}

fn finding(item: &str, have: String, want: String, ok: bool, fix: &str) -> Finding {
    Finding {
        item: item.to_string(),
        have,
        want,
        ok,
        fix: fix.to_string(),
    }
}

/// A `have >= need` finding for a numeric sysctl.
fn at_least(root: &Path, key: &str, item: &str, need: u64, fix: &str) -> Finding {
    let want = format!(">= {need}");
    match read_value(&root.join(key_path(key))) {
        Ok(v) => {
            let ok = num_ge(&v, &need.to_string());
            finding(item, v, want, ok, fix)
        }
        Err(e) => finding(item, format!("unreadable: {e}"), want, false, fix),
    }
}

fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c))
        && !key.contains("..")
        && !key.contains("//")
        && !key.ends_with('/')
}

/// Dots become slashes unless the key already uses slashes (sysctl.d's form for names
/// that contain dots, such as VLAN interfaces).
fn key_path(key: &str) -> String {
    if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    }
}

fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn read_value(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path).map(|s| normalize(&s))
}

fn value_ok(capacity: bool, have: &str, want: &str) -> bool {
    if capacity && is_uint(have) && is_uint(want) {
        return num_ge(have, want);
    }
    have.split_whitespace().eq(want.split_whitespace())
}

fn is_uint(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `a >= b` for unsigned decimal strings of any length; false if either is not a number.
fn num_ge(a: &str, b: &str) -> bool {
    if !is_uint(a) || !is_uint(b) {
        return false;
    }
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    (a.len(), a) >= (b.len(), b)
}

/// (soft, hard) from the "Max open files" line of a `/proc/<pid>/limits` file.
fn nofile_limits(path: &Path) -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or_else(|| format!("no 'Max open files' line in {}", path.display()))?;
    let mut fields = line.split_whitespace().map(|f| match f {
        "unlimited" => Some(u64::MAX),
        n => n.parse::<u64>().ok(),
    });
    match (fields.next().flatten(), fields.next().flatten()) {
        (Some(soft), Some(hard)) => Ok((soft, hard)),
        _ => Err(format!(
            "cannot parse 'Max open files' in {}",
            path.display()
        )),
    }
}

/// MemAvailable in bytes from a `/proc/meminfo` file.
fn mem_available(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb.saturating_mul(1024))
        .ok_or_else(|| format!("no MemAvailable in {}", path.display()))
}

fn show_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

fn show_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake `proc` tree in a temporary directory, removed on drop.
    struct FakeProc {
        dir: PathBuf,
    }

    impl FakeProc {
        fn new() -> FakeProc {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "holdfast-check-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("proc/sys")).unwrap();
            FakeProc { dir }
        }

        /// A host that satisfies everything for `profile`.
        fn tuned(profile: &[(String, String)]) -> FakeProc {
            let p = FakeProc::new();
            for (k, v) in profile {
                p.sysctl(k.trim_start_matches('-'), &v.replace(' ', "\t"));
            }
            p.sysctl("kernel.io_uring_disabled", "0");
            p.limits("2097152", "2097152");
            p.meminfo(64 << 20);
            p
        }

        fn sysctl_root(&self) -> PathBuf {
            self.dir.join("proc/sys")
        }

        fn sysctl(&self, key: &str, value: &str) {
            let path = self.sysctl_root().join(key_path(key));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }

        fn remove(&self, key: &str) {
            std::fs::remove_file(self.sysctl_root().join(key_path(key))).unwrap();
        }

        fn limits(&self, soft: &str, hard: &str) {
            std::fs::create_dir_all(self.dir.join("proc/self")).unwrap();
            let text = format!(
                "Limit                     Soft Limit           Hard Limit           Units     \n\
                 Max cpu time              unlimited            unlimited            seconds   \n\
                 Max open files            {soft:<20} {hard:<20} files     \n\
                 Max locked memory         8388608              8388608              bytes     \n"
            );
            std::fs::write(self.dir.join("proc/self/limits"), text).unwrap();
        }

        fn meminfo(&self, available_kb: u64) {
            let text = format!(
                "MemTotal:       {} kB\nMemFree:        1000 kB\nMemAvailable:   {available_kb} kB\n",
                available_kb * 2
            );
            std::fs::write(self.dir.join("proc/meminfo"), text).unwrap();
        }

        fn check(&self, profile: &[(String, String)], cores: usize, per_core: u64) -> Vec<Finding> {
            check_host(&self.sysctl_root(), profile, cores, per_core)
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn get<'a>(findings: &'a [Finding], item: &str) -> &'a Finding {
        findings
            .iter()
            .find(|f| f.item == item)
            .unwrap_or_else(|| panic!("no finding {item} in {findings:#?}"))
    }

    fn gateway() -> Vec<(String, String)> {
        parse_profile(GATEWAY_PROFILE).expect("shipped profile parses")
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_gateway_profile_parses() {
        let p = gateway();
        let has = |k: &str, v: &str| p.iter().any(|(pk, pv)| pk == k && pv == v);
        assert!(has("net.core.somaxconn", "65535"));
        assert!(has("net.ipv4.tcp_mem", "1310720 2621440 5242880"));
        assert!(has("net.ipv4.tcp_rmem", "4096 16384 1048576"));
        assert!(has("-net.netfilter.nf_conntrack_max", "12582912"));
        assert!(p.len() >= 20, "{} keys", p.len());
        let loadgen = include_str!("../../../kernel-tuning/profiles/loadgen.conf");
        assert!(parse_profile(loadgen).is_ok());
    }

    #[test]
    fn parse_profile_syntax() {
        let text = "# comment\n; also a comment\n\n  net.core.somaxconn=65535  \r\n\
                    net.ipv4.tcp_rmem =\t4096   16384\t1048576\n\
                    -net.netfilter.nf_conntrack_max = 1\n\
                    net/ipv4/conf/eth0.100/rp_filter = 2\n";
        let p = parse_profile(text).unwrap();
        assert_eq!(
            p,
            pairs(&[
                ("net.core.somaxconn", "65535"),
                ("net.ipv4.tcp_rmem", "4096 16384 1048576"),
                ("-net.netfilter.nf_conntrack_max", "1"),
                ("net/ipv4/conf/eth0.100/rp_filter", "2"),
            ])
        );
    }

    #[test]
    fn parse_profile_errors_name_the_line() {
        let err = |t: &str| parse_profile(t).unwrap_err();
        assert_eq!(
            err("a.b = 1\nno equals sign\n"),
            "line 2: expected 'key = value', got: no equals sign"
        );
        assert_eq!(err("a.b =  \n"), "line 1: empty value for a.b");
        assert_eq!(
            err("a.b = 1\n# x\n-a.b = 2\n"),
            "line 3: duplicate key a.b (first on line 1)"
        );
        assert!(err("net/../../etc/passwd = 1").contains("invalid key"));
        assert!(err("net.ipv4.conf.*.rp_filter = 1").contains("invalid key"));
        assert!(err("two words = 1").contains("invalid key"));
        assert!(err("= 1").contains("invalid key"));
        assert_eq!(err("# only comments\n"), "no settings in the profile");
    }

    #[test]
    fn tuned_host_passes_everything() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        let f = host.check(&profile, 4, 1_000_000);
        assert_eq!(f.len(), 6 + profile.len());
        let bad: Vec<_> = f.iter().filter(|f| !f.ok).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(render_table(&f).ends_with(&format!("all {} checks ok\n", f.len())));
    }

    #[test]
    fn profile_keys_compare_by_kind() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        host.sysctl("net.core.somaxconn", "4096"); // capacity, lower
        host.sysctl("net.core.netdev_max_backlog", "100000"); // capacity, higher
        host.sysctl("net.ipv4.tcp_rmem", "4096\t16384\t2097152"); // one field differs
        host.sysctl("net.ipv4.tcp_wmem", "4096  16384\t1048576"); // same fields, other spacing
        host.sysctl("net.ipv4.tcp_fin_timeout", "10"); // exact key, lower is wrong too
        host.sysctl("fs.file-max", "9223372036854775807"); // larger than u64 parse of want
        host.remove("net.ipv4.tcp_mtu_probing"); // required, absent
        host.remove("net.netfilter.nf_conntrack_max"); // optional, absent
        let f = host.check(&profile, 2, 1000);

        let somax = get(&f, "net.core.somaxconn");
        assert!(!somax.ok);
        assert_eq!(
            (somax.have.as_str(), somax.want.as_str()),
            ("4096", ">= 65535")
        );
        assert!(somax.fix.contains("holdfast-tune apply gateway"));
        assert!(get(&f, "net.core.netdev_max_backlog").ok);
        let rmem = get(&f, "net.ipv4.tcp_rmem");
        assert!(!rmem.ok);
        assert_eq!(rmem.have, "4096 16384 2097152");
        assert!(get(&f, "net.ipv4.tcp_wmem").ok);
        assert!(!get(&f, "net.ipv4.tcp_fin_timeout").ok);
        assert!(get(&f, "fs.file-max").ok);
        let mtu = get(&f, "net.ipv4.tcp_mtu_probing");
        assert!(!mtu.ok);
        assert_eq!(mtu.have, "absent");
        let ct = get(&f, "net.netfilter.nf_conntrack_max");
        assert!(ct.ok, "{ct:?}");
        assert_eq!(ct.have, "absent (optional)");
    }

    #[test]
    fn open_file_limits_against_the_per_core_table() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);

        host.limits("1024", "1048576");
        let f = host.check(&profile, 16, 1_000_000);
        let soft = get(&f, "open files, soft (per-core table)");
        assert!(
            soft.ok,
            "hard limit suffices: the gateway raises soft to it"
        );
        assert!(soft.have.contains("raised to the hard limit 1048576"));
        assert_eq!(soft.want, ">= 1000064 (1000000 per core + 64)");
        assert!(get(&f, "open files, hard").ok);

        host.limits("20000", "20000");
        let f = host.check(&profile, 16, 1_000_000);
        let hard = get(&f, "open files, hard");
        assert!(!hard.ok);
        assert!(hard.fix.contains("LimitNOFILE=1048576"), "{}", hard.fix);
        assert!(!get(&f, "open files, soft (per-core table)").ok);

        host.limits("unlimited", "unlimited");
        let f = host.check(&profile, 16, 1_000_000);
        assert!(get(&f, "open files, hard").ok);
        assert_eq!(get(&f, "open files, hard").have, "unlimited");
    }

    #[test]
    fn startup_warnings_name_the_limit_and_sum_up_the_profile() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        assert!(startup_warnings(&host.check(&profile, 2, 1000), &profile).is_empty());

        host.limits("200", "200");
        host.sysctl("net.core.somaxconn", "4096");
        host.sysctl("net.ipv4.tcp_fin_timeout", "60");
        host.sysctl("kernel.io_uring_disabled", "2");
        let w = startup_warnings(&host.check(&profile, 2, 1000), &profile);
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].starts_with("open-file limit too low for the configured tables: soft 200")
                && w[0].contains("fix: LimitNOFILE=2048"),
            "{}",
            w[0]
        );
        assert!(w[1].contains("kernel.io_uring_disabled is 2"), "{}", w[1]);
        assert!(
            w[2].starts_with("2 kernel setting(s) differ from the gateway tuning profile")
                && w[2].contains("holdfast-tune apply gateway"),
            "{}",
            w[2]
        );
    }

    #[test]
    fn nr_open_and_file_max_scale_with_connections() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        host.sysctl("fs.nr_open", "1048576");
        host.sysctl("fs.file-max", "2466177");
        // 16 cores x 200k: per-core table fits nr_open, 3.2M files exceed file-max.
        let f = host.check(&profile, 16, 200_000);
        assert!(get(&f, "fs.nr_open (per-core table)").ok);
        let fm = get(&f, "fs.file-max (all connections)");
        assert!(!fm.ok);
        assert_eq!(fm.want, ">= 3200000");
        // 2M per core exceeds nr_open.
        let f = host.check(&profile, 1, 2_000_000);
        assert!(!get(&f, "fs.nr_open (per-core table)").ok);
    }

    #[test]
    fn memory_estimate() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        host.meminfo(8 << 20); // 8 GiB available
        let f = host.check(&profile, 4, 250_000); // 1M conns x 8 KiB = 7.6 GiB
        let m = get(&f, "memory (MemAvailable)");
        assert!(m.ok, "{m:?}");
        assert!(m.want.contains("4 KiB user + 4 KiB kernel"));
        let f = host.check(&profile, 4, 500_000); // 2M conns = 15.3 GiB
        let m = get(&f, "memory (MemAvailable)");
        assert!(!m.ok);
        assert_eq!(m.have, "8.0 GiB");
    }

    #[test]
    fn io_uring_switch() {
        let profile = gateway();
        let host = FakeProc::tuned(&profile);
        host.sysctl("kernel.io_uring_disabled", "2");
        let f = host.check(&profile, 1, 10);
        let io = get(&f, "kernel.io_uring_disabled");
        assert!(!io.ok);
        assert!(io.fix.contains("kernel.io_uring_disabled=0"));
        host.remove("kernel.io_uring_disabled");
        assert!(get(&host.check(&profile, 1, 10), "kernel.io_uring_disabled").ok);
    }

    #[test]
    fn missing_proc_files_are_findings_not_panics() {
        let host = FakeProc::new();
        let profile = pairs(&[("net.core.somaxconn", "65535")]);
        let f = host.check(&profile, 1, 10);
        assert_eq!(f.len(), 7);
        assert!(!get(&f, "open files, hard").ok);
        assert!(!get(&f, "memory (MemAvailable)").ok);
        assert!(get(&f, "net.core.somaxconn").have == "absent");
    }

    #[test]
    fn render_table_aligns_columns() {
        let f = vec![
            finding("a", "1".into(), "2".into(), false, "do x"),
            finding(
                "longer item",
                "12345".into(),
                ">= 7".into(),
                true,
                "never shown",
            ),
        ];
        let t = render_table(&f);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], "item        | have  | want | status | fix");
        assert_eq!(lines[1], "----------- | ----- | ---- | ------ | ----");
        assert_eq!(lines[2], "a           | 1     | 2    | FIX    | do x");
        assert_eq!(lines[3], "longer item | 12345 | >= 7 | ok     | -");
        assert_eq!(lines[4], "1 of 2 checks need a fix");
        assert!(t.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn number_comparison_handles_any_length() {
        assert!(num_ge("18446744073709551615", "16777216"));
        assert!(num_ge("0065535", "65535"));
        assert!(!num_ge("4096", "65535"));
        assert!(!num_ge("x", "1"));
    }
}
