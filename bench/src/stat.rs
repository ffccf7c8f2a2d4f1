//! Machine state around a measurement: CPU steal from /proc/stat.

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
