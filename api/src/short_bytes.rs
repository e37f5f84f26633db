//! Equality and NUL scans of short byte strings (keys, resource names) in
//! place: on the limiter's path, where a key is a few bytes long, a call to
//! `memcmp` or a byte loop costs more than the whole comparison.
//!
//! Strings of 4 to 16 bytes are read as two machine words that overlap;
//! shorter ones byte by byte, longer ones by the standard library.

/// Whether `a` and `b` hold the same bytes.
#[inline(always)]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        _ => a == b,
    }
}

/// Whether `b` holds a NUL byte.
#[inline(always)]
pub(crate) fn has_nul(b: &[u8]) -> bool {
    // A word holds a zero byte exactly when this is not zero (the classic
    // test: only a zero byte turns its top bit on when one is taken away
    // from each byte, without being on already).
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |w: u64| w.wrapping_sub(LOW) & !w & HIGH != 0;
    let n = b.len();
    match n {
        8..=16 => zero_in(word(b, 0)) || zero_in(word(b, n - 8)),
        4..=7 => {
            let zero_in_half = |w: u32| w.wrapping_sub(LOW as u32) & !w & HIGH as u32 != 0;
            zero_in_half(half(b, 0)) || zero_in_half(half(b, n - 4))
        }
        _ => b.contains(&0),
    }
}

/// The 8 bytes of `s` from `at`.
#[inline(always)]
fn word(s: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// The 4 bytes of `s` from `at`.
#[inline(always)]
fn half(s: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&s[at..at + 4]);
    u32::from_ne_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length up to 40, a difference or a NUL at every position,
    /// against the obvious answers.
    #[test]
    fn agrees_with_the_standard_library() {
        for n in 0..40usize {
            let base: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(same(&base, &base.clone()), "{n}");
            assert!(!has_nul(&base), "{n}");
            if n > 0 {
                assert!(!same(&base, &base[..n - 1]), "{n}: lengths differ");
            }
            for at in 0..n {
                for byte in [0u8, 1, 0x80, 0xff, b'b'] {
                    let mut other = base.clone();
                    other[at] = byte;
                    assert_eq!(same(&base, &other), base == other, "{n} {at} {byte}");
                    assert_eq!(has_nul(&other), other.contains(&0), "{n} {at} {byte}");
                }
            }
        }
    }
}
