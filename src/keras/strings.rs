//! String-list attributes as Keras writes them: variable- or fixed-length, ASCII or UTF-8,
//! scalar or 1-D, an empty float array for "none", and split into `name0`, `name1`, … when large.

use anyhow::{bail, Context, Result};
use hdf5::types::{FixedAscii, FixedUnicode, TypeDescriptor, VarLenAscii, VarLenUnicode};

/// Longest string a fixed-length attribute may hold here (Keras names are far shorter).
const MAX_FIXED: usize = 4096;

/// Reads attribute `name` of `loc` (or its chunks `name0`, `name1`, …). `None` if absent.
pub fn read_string_list(loc: &hdf5::Location, name: &str) -> Result<Option<Vec<String>>> {
    let names = loc.attr_names()?;
    if names.iter().any(|n| n == name) {
        return read_one(loc, name).map(Some);
    }
    let mut out = Vec::new();
    let mut chunk = 0;
    while names.iter().any(|n| *n == format!("{name}{chunk}")) {
        out.extend(read_one(loc, &format!("{name}{chunk}"))?);
        chunk += 1;
    }
    Ok((chunk > 0).then_some(out))
}

/// Reads a scalar string attribute (e.g. `keras_version`). `None` if absent.
pub fn read_string(loc: &hdf5::Location, name: &str) -> Result<Option<String>> {
    Ok(read_string_list(loc, name)?.and_then(|v| v.into_iter().next()))
}

fn read_one(loc: &hdf5::Location, name: &str) -> Result<Vec<String>> {
    let attr = loc.attr(name)?;
    if attr.size() == 0 {
        return Ok(Vec::new()); // Keras writes an empty float64 array for weightless layers
    }
    let descriptor = attr.dtype()?.to_descriptor().with_context(|| format!("attribute `{name}`: unreadable type"))?;
    let strings = match descriptor {
        TypeDescriptor::VarLenAscii => attr.read_raw::<VarLenAscii>()?.iter().map(|s| s.as_str().to_owned()).collect(),
        TypeDescriptor::VarLenUnicode => attr.read_raw::<VarLenUnicode>()?.iter().map(|s| s.as_str().to_owned()).collect(),
        TypeDescriptor::FixedAscii(n) if n <= MAX_FIXED => {
            attr.read_raw::<FixedAscii<MAX_FIXED>>()?.iter().map(|s| s.as_str().to_owned()).collect()
        }
        TypeDescriptor::FixedUnicode(n) if n <= MAX_FIXED => {
            attr.read_raw::<FixedUnicode<MAX_FIXED>>()?.iter().map(|s| s.as_str().to_owned()).collect()
        }
        other => bail!("attribute `{name}` holds {other:?}, not strings"),
    };
    Ok(strings)
}
