//! Process-wide settings an application embedding the engine can apply when it starts.
//!
//! The engine itself never changes process-wide state: a library should not. The `fhirkeep`
//! binary and the benchmark binaries call [`disable_transparent_huge_pages`] first thing.

/// Turns transparent huge pages off for this process (Linux `prctl(PR_SET_THP_DISABLE)`,
/// as database servers such as Redis and MongoDB advise), so that memory faulted in from now
/// on comes in 4 KiB pages. Returns `Ok(false)` where the platform has no such switch.
///
/// Why: a commit allocates and frees buffers of hundreds of KiB (prepared versions, the
/// batch's bookkeeping, redb's dirty pages); the allocator gives freed memory back and takes
/// it again, and with huge pages every such fault clears 2 MiB. That was 12 % of the time of
/// a commit of 1,000 random-id resources. Measured in one session, alternating
/// (BENCHMARKS.md, "Transparent huge pages off"): random-id ingest 34.7–39.2k/s against
/// 32.2–35.1k/s, sequential-id ingest and warm reads no slower.
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::disable_transparent_huge_pages(true)?;
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(false)
    }
}

/// The number of cores this process may use, read once: the standard library reads the
/// cgroup files again on every call, which showed in commit profiles.
pub(crate) fn available_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn huge_pages_are_off_afterwards_where_the_platform_has_the_switch() {
        let switched = super::disable_transparent_huge_pages().unwrap();
        #[cfg(target_os = "linux")]
        {
            assert!(switched);
            assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap());
        }
        #[cfg(not(target_os = "linux"))]
        assert!(!switched);
    }
}
