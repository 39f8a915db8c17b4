//! AMBROSIA's "ZigZagInt" and "ZigZagLong": ZigZag followed by LEB128, exactly
//! protobuf's `sint32`/`sint64`. At most 5 bytes for an int and 10 for a long; readers
//! accept padded (non-minimal) encodings, writers always write minimal ones.

use super::WireError;

/// Longest encoding of a ZigZagInt.
pub const MAX_INT_LEN: usize = 5;
/// Longest encoding of a ZigZagLong.
pub const MAX_LONG_LEN: usize = 10;

/// Appends `v` as a ZigZagInt.
pub fn put_int(out: &mut Vec<u8>, v: i32) {
    put_unsigned(out, u64::from(((v << 1) ^ (v >> 31)) as u32));
}

/// Appends `v` as a ZigZagLong.
pub fn put_long(out: &mut Vec<u8>, v: i64) {
    put_unsigned(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Number of bytes `put_int(v)` writes.
pub fn int_len(v: i32) -> usize {
    unsigned_len(u64::from(((v << 1) ^ (v >> 31)) as u32))
}

/// Number of bytes `put_long(v)` writes.
pub fn long_len(v: i64) -> usize {
    unsigned_len(((v << 1) ^ (v >> 63)) as u64)
}

fn unsigned_len(mut u: u64) -> usize {
    let mut n = 1;
    while u >= 0x80 {
        u >>= 7;
        n += 1;
    }
    n
}

fn put_unsigned(out: &mut Vec<u8>, mut u: u64) {
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}

/// Reads a LEB128 value of at most `max_len` bytes and `bits` significant bits.
/// `Ok(None)` means the input ends before the value does.
fn get_unsigned(input: &[u8], max_len: usize, bits: u32) -> Result<Option<(u64, usize)>, WireError> {
    let mut value: u64 = 0;
    for (i, &byte) in input.iter().enumerate() {
        if i == max_len {
            return Err(WireError::VarintTooLong { max: max_len });
        }
        let shift = 7 * i as u32;
        let group = u64::from(byte & 0x7f);
        // Bits that would land beyond the type's width make the value unrepresentable.
        if shift + 7 > bits && (group >> (bits - shift)) != 0 {
            return Err(WireError::VarintOverflow { bits });
        }
        value |= group << shift;
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if input.len() >= max_len {
        return Err(WireError::VarintTooLong { max: max_len });
    }
    Ok(None)
}

/// Reads a ZigZagInt from the front of `input`: the value and the bytes it took, or
/// `None` if `input` ends first.
pub fn get_int(input: &[u8]) -> Result<Option<(i32, usize)>, WireError> {
    Ok(get_unsigned(input, MAX_INT_LEN, 32)?.map(|(u, n)| {
        let u = u as u32;
        (((u >> 1) as i32) ^ -((u & 1) as i32), n)
    }))
}

/// Reads a ZigZagLong from the front of `input`: the value and the bytes it took, or
/// `None` if `input` ends first.
pub fn get_long(input: &[u8]) -> Result<Option<(i64, usize)>, WireError> {
    Ok(get_unsigned(input, MAX_LONG_LEN, 64)?.map(|(u, n)| (((u >> 1) as i64) ^ -((u & 1) as i64), n)))
}

/// Reads a ZigZagInt that must be complete within `input`.
pub(crate) fn take_int(input: &mut &[u8]) -> Result<i32, WireError> {
    let (v, n) = get_int(input)?.ok_or(WireError::Truncated { what: "varint" })?;
    *input = &input[n..];
    Ok(v)
}

/// Reads a ZigZagLong that must be complete within `input`.
pub(crate) fn take_long(input: &mut &[u8]) -> Result<i64, WireError> {
    let (v, n) = get_long(input)?.ok_or(WireError::Truncated { what: "varint" })?;
    *input = &input[n..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn int(v: i32) -> Vec<u8> {
        let mut out = Vec::new();
        put_int(&mut out, v);
        out
    }

    fn long(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_long(&mut out, v);
        out
    }

    #[test]
    fn vectors_from_ambrosia_wire() {
        assert_eq!(int(9), [0x12]);
        assert_eq!(int(32), [0x40]);
        assert_eq!(int(-65), [0x81, 0x01]);
        assert_eq!(int(300), [0xD8, 0x04]);
        assert_eq!(int(i32::MAX), [0xFE, 0xFF, 0xFF, 0xFF, 0x0F]);
        assert_eq!(long(1_000_000), [0x80, 0x89, 0x7A]);
        assert_eq!(get_int(&[0x81, 0x01]).unwrap(), Some((-65, 2)));
        assert_eq!(get_long(&[0x80, 0x89, 0x7A]).unwrap(), Some((1_000_000, 3)));
    }

    #[test]
    fn padded_encodings_are_accepted() {
        // The outer size of `82 80 80 80 00 02`, a valid TakeCheckpoint.
        assert_eq!(get_int(&[0x82, 0x80, 0x80, 0x80, 0x00]).unwrap(), Some((1, 5)));
    }

    #[test]
    fn too_long_and_overflowing_are_errors() {
        assert!(matches!(get_int(&[0x80; 6]), Err(WireError::VarintTooLong { max: 5 })));
        assert!(matches!(get_int(&[0x80, 0x80, 0x80, 0x80, 0x10]), Err(WireError::VarintOverflow { .. })));
        assert!(matches!(get_long(&[0x80; 11]), Err(WireError::VarintTooLong { max: 10 })));
        assert!(matches!(
            get_long(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]),
            Err(WireError::VarintOverflow { .. })
        ));
        // Five continuation bytes with nothing after is already too long for an int.
        assert!(matches!(get_int(&[0x80; 5]), Err(WireError::VarintTooLong { .. })));
    }

    #[test]
    fn incomplete_is_none() {
        assert_eq!(get_int(&[]).unwrap(), None);
        assert_eq!(get_int(&[0x80, 0x80]).unwrap(), None);
        assert_eq!(get_long(&[0xFF; 9]).unwrap(), None);
    }

    #[test]
    fn extremes_round_trip() {
        for v in [0, 1, -1, i32::MIN, i32::MAX] {
            let e = int(v);
            assert_eq!(e.len(), int_len(v));
            assert_eq!(get_int(&e).unwrap(), Some((v, e.len())));
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            let e = long(v);
            assert_eq!(e.len(), long_len(v));
            assert_eq!(get_long(&e).unwrap(), Some((v, e.len())));
        }
    }

    proptest! {
        #[test]
        fn int_round_trips(v: i32) {
            let e = int(v);
            prop_assert_eq!(e.len(), int_len(v));
            prop_assert_eq!(get_int(&e).unwrap(), Some((v, e.len())));
        }

        #[test]
        fn long_round_trips(v: i64) {
            let e = long(v);
            prop_assert_eq!(e.len(), long_len(v));
            prop_assert_eq!(get_long(&e).unwrap(), Some((v, e.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = get_int(&bytes);
            let _ = get_long(&bytes);
        }
    }
}
