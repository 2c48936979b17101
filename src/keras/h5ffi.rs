//! The few libhdf5 calls the hdf5 crate does not wrap, for Keras 3's bfloat16 datasets: a 2-byte
//! *opaque* type, which the crate's `TypeDescriptor` cannot describe (so it can neither tell it
//! apart, read it, nor write it). libhdf5 itself is linked by hdf5-metno-sys; every call here runs under the
//! hdf5 crate's library lock, as the crate's own calls do.

use anyhow::{ensure, Result};
use std::os::raw::{c_int, c_void};

/// `hid_t` since HDF5 1.10 (the `let id: Hid = ….id()` below fail to build against an older one).
type Hid = i64;
/// `H5S_ALL` and `H5P_DEFAULT`.
const H5S_ALL: Hid = 0;
const H5P_DEFAULT: Hid = 0;
/// `H5T_class_t`'s values.
pub const H5T_OPAQUE: c_int = 5;

extern "C" {
    fn H5Tget_class(type_id: Hid) -> c_int;
    fn H5Dread(dset_id: Hid, mem_type_id: Hid, mem_space_id: Hid, file_space_id: Hid, plist_id: Hid, buf: *mut c_void) -> c_int;
}

/// The HDF5 class of a datatype (`H5T_class_t`; -1 on error).
pub fn type_class(datatype: &hdf5::Datatype) -> c_int {
    let id: Hid = datatype.id();
    hdf5::sync::sync(|| unsafe { H5Tget_class(id) })
}

/// Reads a whole dataset in its own (file) type, whatever its layout and filters: the element
/// bytes as stored, `element_size` bytes each, with no conversion.
pub fn read_own_type(ds: &hdf5::Dataset, element_size: usize) -> Result<Vec<u8>> {
    let datatype = ds.dtype()?;
    ensure!(datatype.size() == element_size, "element size {} where {element_size} was expected", datatype.size());
    let mut buf = vec![0u8; ds.size() * element_size];
    if buf.is_empty() {
        return Ok(buf);
    }
    let (ds_id, type_id): (Hid, Hid) = (ds.id(), datatype.id());
    // SAFETY: `buf` holds every element of the dataset's (whole) selection in the memory type,
    // which is the dataset's own type of `element_size` bytes.
    let status = hdf5::sync::sync(|| unsafe { H5Dread(ds_id, type_id, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.as_mut_ptr().cast()) });
    ensure!(status >= 0, "libhdf5 could not read the data (H5Dread failed)");
    Ok(buf)
}

/// Writes a dataset of a 2-byte opaque type as Keras 3 does for bfloat16 (h5py's
/// `create_dataset(data=<ml_dtypes.bfloat16 array>)`), optionally chunked, with the `dtype`
/// attribute if given (Keras writes "bfloat16"). Tests write Keras-like files with it.
#[cfg(test)]
pub fn write_opaque(group: &hdf5::Group, name: &str, shape: &[usize], bytes: &[u8], chunk: Option<&[usize]>, dtype_attr: Option<&str>) -> Result<()> {
    ensure!(bytes.len() == shape.iter().product::<usize>() * 2, "{name}: {} bytes for shape {shape:?}", bytes.len());
    let mut dcpl = hdf5::plist::DatasetCreate::build();
    if let Some(chunk) = chunk {
        dcpl.chunk(chunk.to_vec());
    }
    create_opaque(group, name, shape, dcpl.finish()?, Some(bytes), dtype_attr).map(|_| ())
}

/// Creates a contiguous 2-byte opaque dataset (Keras' bfloat16, tagged by `dtype_attr`) with its
/// storage allocated at once and never filled, and returns where in the file its bytes go (None
/// for an empty one): the caller writes them there.
pub fn create_opaque_placed(group: &hdf5::Group, name: &str, shape: &[usize], dtype_attr: Option<&str>) -> Result<Option<u64>> {
    use hdf5::dataset::{AllocTime, FillTime};
    let dcpl = hdf5::plist::DatasetCreate::build().alloc_time(Some(AllocTime::Early)).fill_time(FillTime::Never).finish()?;
    create_opaque(group, name, shape, dcpl, None, dtype_attr)
}

fn create_opaque(group: &hdf5::Group, name: &str, shape: &[usize], dcpl: hdf5::plist::DatasetCreate, bytes: Option<&[u8]>, dtype_attr: Option<&str>) -> Result<Option<u64>> {
    use std::os::raw::c_char;
    extern "C" {
        fn H5Tcreate(class: c_int, size: usize) -> Hid;
        fn H5Tclose(type_id: Hid) -> c_int;
        fn H5Dcreate2(loc_id: Hid, name: *const c_char, type_id: Hid, space_id: Hid, lcpl_id: Hid, dcpl_id: Hid, dapl_id: Hid) -> Hid;
        fn H5Dwrite(dset_id: Hid, mem_type_id: Hid, mem_space_id: Hid, file_space_id: Hid, plist_id: Hid, buf: *const c_void) -> c_int;
        fn H5Dclose(dset_id: Hid) -> c_int;
    }
    let space = hdf5::Dataspace::try_new(shape.to_vec())?;
    let cname = std::ffi::CString::new(name)?;
    let (loc, space_id, dcpl_id): (Hid, Hid, Hid) = (group.id(), space.id(), dcpl.id());
    let status = hdf5::sync::sync(|| unsafe {
        let datatype = H5Tcreate(H5T_OPAQUE, 2);
        if datatype < 0 {
            return -1;
        }
        let ds = H5Dcreate2(loc, cname.as_ptr(), datatype, space_id, H5P_DEFAULT, dcpl_id, H5P_DEFAULT);
        let status = match bytes {
            _ if ds < 0 => -1,
            Some(bytes) => H5Dwrite(ds, datatype, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.as_ptr().cast()),
            None => 0,
        };
        if ds >= 0 {
            H5Dclose(ds);
        }
        H5Tclose(datatype);
        status
    });
    ensure!(status >= 0, "{name}: cannot write the opaque dataset");
    let ds = group.dataset(name)?;
    if let Some(value) = dtype_attr {
        let value: hdf5::types::VarLenUnicode = value.parse()?;
        ds.new_attr::<hdf5::types::VarLenUnicode>().create("dtype")?.write_scalar(&value)?;
    }
    Ok(ds.offset())
}
