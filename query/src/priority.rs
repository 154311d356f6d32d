//! Which threads run the index's work, and at what scheduling priority.
//!
//! Index work (extracting terms, tantivy's indexing worker) runs at nice [`INDEX_NICE`],
//! below the store writes and the reads it follows. A write waits for its store commit, and
//! a bulk load joins its index catch-up only at the end of each batch, so when both want the
//! two cores the store's single inserting thread, on the critical path, should win: index
//! work then fills the time the writer leaves (its disk syncs) instead of taking cores from
//! it. Measured on bulk loads of random-id resources: +6–8 % (BENCHMARKS.md, query layer,
//! "fewer index terms, index work at a lower priority").
//!
//! Linux only: there `setpriority` on the calling "process" sets the calling thread's nice
//! value; elsewhere it would change the whole process, so other platforms leave it alone.

/// The nice value of index threads (0 is the default, 19 the lowest priority).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) const INDEX_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`INDEX_NICE`] (never raises it: a thread already
/// lower stays so). Best effort: a refusal leaves the thread as it was.
pub(crate) fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    if let Ok(current) = rustix::process::getpriority_process(None)
        && current < INDEX_NICE
    {
        let _ = rustix::process::setpriority_process(None, INDEX_NICE);
    }
}

/// Runs `body` on a thread at [`INDEX_NICE`] and waits for it: tantivy spawns its indexing
/// workers in the thread that creates the writer, commits or rolls back, and they inherit
/// that thread's priority.
pub(crate) fn on_index_thread<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                lower_this_thread();
                body()
            })
            .join()
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The thread pool that extracts index terms in parallel: one thread per core, each at
/// [`INDEX_NICE`]. Its own pool, so that the application's rayon threads keep their
/// priority. `None` if the pool could not be started (the global pool does the work then).
pub(crate) fn index_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("fhirkeep-index-{i}"))
            .start_handler(|_| lower_this_thread())
            .build()
            .ok()
    })
    .as_ref()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn only_the_index_thread_is_lowered() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = on_index_thread(|| rustix::process::getpriority_process(None).unwrap());
        assert!(inside >= INDEX_NICE, "{inside}");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
        let pooled = index_pool()
            .unwrap()
            .install(|| rustix::process::getpriority_process(None).unwrap());
        assert!(pooled >= INDEX_NICE, "{pooled}");
    }
}
