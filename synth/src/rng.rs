//! The deterministic random stream every generated value comes from.

/// A small, fast, deterministic PRNG (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; tiny modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index into a slice of length `len` (`len > 0`).
    pub fn index(&mut self, len: usize) -> usize {
        // Slices here are tiny; the u64 -> usize conversion cannot truncate a value below len.
        usize::try_from(self.below(len as u64)).unwrap_or(0)
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Roughly normal (sum of four uniforms), mean `mean`, standard deviation `sd`.
    pub fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let sum: f64 = (0..4).map(|_| self.unit()).sum();
        // Sum of 4 U(0,1): mean 2, variance 1/3.
        mean + sd * (sum - 2.0) * 3f64.sqrt()
    }

    /// Picks an element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Mixes several values into one seed (order matters).
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &p in parts {
        h = SplitMix64::new(h ^ p).next_u64();
    }
    h
}

/// A UUID-shaped id (version-4 and variant-1 bits, like a real random UUID) from `rng`.
pub(crate) fn uuid_id(rng: &mut SplitMix64) -> String {
    let hi = rng.next_u64();
    let lo = rng.next_u64();
    let hi = (hi & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
    let lo = (lo & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
    uuid_text(hi, lo)
}

/// A UUIDv7-shaped id: `millis` in the 48-bit timestamp, then `ordinal` in the next 22 bits
/// (so ids of one millisecond rise with it), random bits after. Ids sort as
/// `(millis, ordinal)` do, for ordinals below 2^22.
pub(crate) fn time_ordered_uuid_id(millis: u64, ordinal: u64, rng: &mut SplitMix64) -> String {
    let ordinal = ordinal.min((1 << 22) - 1);
    let random = rng.next_u64();
    // 48 bits time | version 7 | 12 high bits of the ordinal.
    let hi = ((millis & 0xFFFF_FFFF_FFFF) << 16) | 0x7000 | (ordinal >> 10);
    // variant 10 | 10 low bits of the ordinal | 52 random bits.
    let lo = 0x8000_0000_0000_0000 | ((ordinal & 0x3FF) << 52) | (random & 0x000F_FFFF_FFFF_FFFF);
    uuid_text(hi, lo)
}

/// The canonical 8-4-4-4-12 text of the 128 bits `hi ‖ lo`.
fn uuid_text(hi: u64, lo: u64) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}
