//! Machine and process state around a measurement: CPU steal from /proc/stat, a
//! process's CPU time and memory from /proc/<pid>.

/// Cumulative (steal, total) jiffies of all CPUs.
pub fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total = v.iter().take(8).sum();
    (v.get(7).copied().unwrap_or(0), total)
}

/// Steal percentage between two readings.
pub fn steal_pct(before: (u64, u64), after: (u64, u64)) -> f64 {
    let dt = after.1.saturating_sub(before.1);
    if dt == 0 {
        return 0.0;
    }
    after.0.saturating_sub(before.0) as f64 * 100.0 / dt as f64
}

/// Median and (min, max) of a set of numbers.
pub fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// A process's (resident kB, peak resident kB, CPU ticks user+system) from /proc; zeros
/// when it is gone.
pub fn proc_usage_full(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, r)| {
            r.split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    // Fields after the command: state(0) ... utime(11) stime(12).
    let cpu = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    (kb("VmRSS:"), kb("VmHWM:"), cpu)
}

/// A process's (resident kB, CPU ticks).
pub fn proc_usage(pid: u32) -> (u64, u64) {
    let (rss, _, cpu) = proc_usage_full(pid);
    (rss, cpu)
}

/// Clock ticks per second of /proc CPU times.
pub const TICKS_PER_SEC: f64 = 100.0;
