//! The allocator of the extension module.
//!
//! Decoding allocates and frees large short-lived buffers all the time (page data, decoded
//! column chunks, batch slabs). The system allocator hands freed blocks of that size back to
//! the kernel and faults fresh, zeroed pages in for the next chunk, which cost about a fifth
//! of the reader's CPU time. The module therefore allocates with mimalloc told to keep freed
//! memory for reuse: the reader's footprint stays at its peak (bounded by `prefetch`) instead
//! of shrinking and growing again. Only this module's own allocations are affected; torch and
//! Python keep their allocators.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers); `-1` means
/// freed memory is never returned to the operating system.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

pub(crate) fn keep_freed_memory() {
    // SAFETY: setting an option is allowed at any time; it only changes when freed pages are
    // decommitted.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}
