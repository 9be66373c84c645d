//! The allocator of the extension module.
//!
//! Decoding allocates and frees large short-lived buffers all the time (page data, decoded
//! column chunks, batch slabs). The system allocator hands freed blocks of that size back to
//! the kernel and faults fresh, zeroed pages in for the next chunk, which cost about a fifth
//! of the reader's CPU time. The module therefore allocates with mimalloc told to keep freed
//! memory for reuse: the reader's footprint stays at its peak (bounded by `prefetch`) instead
//! of shrinking and growing again. Only this module's own allocations are affected; torch and
//! Python keep their allocators.
//!
//! mimalloc also commits its arenas lazily here, as they are used. By default it commits a
//! whole arena up front where the system overcommits (Linux); with transparent huge pages on,
//! the first touch of any part of a committed 2 MiB range then faults in and zeroes all of it,
//! while each thread's heap uses its pages sparsely at first. Measured on a 2-core Xeon with
//! THP `always`: the first pass of a new process over the end-to-end benchmark's data spent
//! about 13 ms of kernel time per 4096-row batch zeroing pages (9.7 ms a batch wall clock);
//! committed lazily, 1.4 to 1.7 ms (3.2 to 4.1 ms a batch).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers); `-1` means
/// freed memory is never returned to the operating system.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's `mi_option_arena_eager_commit` (the same index in its v2 and v3 headers); `0`
/// commits an arena's memory as it is used instead of all at once.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the options above: freed memory kept for reuse, arenas committed as used.
pub(crate) fn configure_allocator() {
    // SAFETY: setting an option is allowed at any time; it only changes when freed pages are
    // decommitted, and how arenas reserved from now on are committed.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}
