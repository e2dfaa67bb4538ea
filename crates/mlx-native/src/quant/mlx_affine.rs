//! MLX affine quantization: groups of `group_size` consecutive elements of a row share a
//! scale and a bias; element = scale · q + bias with q an unsigned `bits`-bit integer.

use crate::{Error, Result};

pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

pub fn check_params(bits: u32, group_size: usize) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) || !SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Err(Error::UnsupportedQuant(format!(
            "MLX affine bits={bits} group_size={group_size} (bits in {SUPPORTED_BITS:?}, group sizes in {SUPPORTED_GROUP_SIZES:?})"
        )));
    }
    Ok(())
}
