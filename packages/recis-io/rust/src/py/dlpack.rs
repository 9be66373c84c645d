//! Hands a ring buffer to torch without copying, through a DLPack capsule. The buffer returns
//! to its ring when torch frees the last tensor viewing it (and, for a packed chunk, when the
//! reader has released the chunk too).

use std::ffi::{c_void, CStr};

use pyo3::ffi;
use pyo3::prelude::*;

use crate::core::ring::SlabRef;

const NAME: &CStr = c"dltensor";

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// A batch buffer handed to torch: the batch's own, or a packed chunk's, shared with it.
struct Owner {
    slab: SlabRef,
    shape: [i64; 1],
}

const DL_CPU: i32 = 1;
const DL_UINT: u8 = 1;

unsafe extern "C" fn delete_managed(t: *mut DLManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` and its context were made by `Box::into_raw` in `slab_capsule`, and the
    // DLPack contract calls the deleter exactly once.
    unsafe {
        let managed = Box::from_raw(t);
        drop(Box::from_raw(managed.manager_ctx.cast::<Owner>()));
    }
}

unsafe extern "C" fn destroy_capsule(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and takes over the deleter; only an
    // unconsumed capsule still owns the tensor.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()).cast::<DLManagedTensor>();
            delete_managed(t);
        }
    }
}

/// A "dltensor" capsule holding `slab` as a 1-D uint8 CPU tensor.
pub fn slab_capsule(py: Python<'_>, slab: SlabRef) -> PyResult<Bound<'_, PyAny>> {
    let mut owner = Box::new(Owner {
        shape: [slab.slab().len() as i64],
        slab,
    });
    let data = owner.slab.slab().as_ptr() as *mut c_void;
    let shape = owner.shape.as_mut_ptr();
    let managed = Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            data,
            device: DLDevice {
                device_type: DL_CPU,
                device_id: 0,
            },
            ndim: 1,
            dtype: DLDataType {
                code: DL_UINT,
                bits: 8,
                lanes: 1,
            },
            shape,
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: Box::into_raw(owner).cast(),
        deleter: Some(delete_managed),
    }));
    // SAFETY: `managed` is a valid heap pointer; on failure we free it ourselves.
    unsafe {
        let capsule = ffi::PyCapsule_New(managed.cast(), NAME.as_ptr(), Some(destroy_capsule));
        if capsule.is_null() {
            delete_managed(managed);
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, capsule))
    }
}
