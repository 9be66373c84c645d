//! Host kernels of recis-kernels.
//!
//! Each kernel is one pass over the elements of several features at once, every feature with
//! its own parameters, the way the CUDA kernels run on a GPU: the features are read where they
//! lie (no packed copy) and the elements are shared out between threads in equal runs, whatever
//! the features' sizes. The kernels work on slices; `python` (the `python` feature) binds them
//! to torch tensors' memory.

pub mod block_rows;
pub mod bucketize;
pub mod cross;
pub mod divide;
pub mod group;
pub mod idmap;
pub mod interleave;
pub mod optim;
pub mod radix;
pub mod rows_grad;
pub mod shares;
pub mod truncate;
pub mod uniform;

#[cfg(feature = "python")]
mod python;
