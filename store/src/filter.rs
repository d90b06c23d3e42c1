//! A blocked Bloom filter over 128-bit keys: each key sets 6 bits inside one 512-bit block (one
//! cache line), so a lookup costs one memory access per filter. About 1-2% false positives at
//! the 10 bits a key it is sized for.
//!
//! Filters are persisted with their run, so the hash is written out here rather than taken from a
//! crate whose output may change between versions.

const BLOCK_WORDS: usize = 8;
const BITS_PER_KEY: u64 = 10;
const PROBES: u32 = 6;

/// The hash of a filter key, computed once and tested against every run's filter.
#[derive(Clone, Copy)]
pub struct KeyHash(u64);

impl KeyHash {
    pub fn of(key: &[u8; 16]) -> KeyHash {
        let low = u64::from_le_bytes(key[..8].try_into().unwrap());
        let high = u64::from_le_bytes(key[8..].try_into().unwrap());
        KeyHash(mix(low ^ mix(high ^ 0x9e37_79b9_7f4a_7c15)))
    }
}

/// A 64-bit finalizer (splitmix64's): every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Bytes of one block as persisted (`Filter::encode_into`: little-endian words).
pub const BLOCK_BYTES: usize = BLOCK_WORDS * 8;

/// The block of a filter of `blocks` blocks that `hash` falls in, and the bits it tests there.
fn locate(hash: KeyHash, blocks: usize) -> (usize, u64) {
    let block = ((hash.0 as u128 * blocks as u128) >> 64) as usize;
    (block, mix(hash.0.rotate_left(32)))
}

/// Whether the block whose words `word` reads has every bit of `bits` set.
fn holds(word: impl Fn(usize) -> u64, mut bits: u64) -> bool {
    for _ in 0..PROBES {
        let bit = (bits & 511) as usize;
        if word(bit / 64) & (1 << (bit % 64)) == 0 {
            return false;
        }
        bits >>= 9;
    }
    true
}

/// For a filter of `blocks` blocks read from its persisted form a block at a time: the block
/// `hash` falls in.
pub fn block_of(hash: KeyHash, blocks: usize) -> usize {
    locate(hash, blocks).0
}

/// Whether `block` (`BLOCK_BYTES` as persisted, the block `block_of` named) may hold `hash`.
pub fn persisted_block_may_contain(block: &[u8], hash: KeyHash) -> bool {
    let (_, bits) = locate(hash, 1);
    holds(|word| u64::from_le_bytes(block[word * 8..word * 8 + 8].try_into().unwrap()), bits)
}

pub struct Filter {
    blocks: Vec<[u64; BLOCK_WORDS]>,
}

impl Filter {
    /// A filter sized for `keys` distinct keys.
    pub fn with_capacity(keys: u64) -> Filter {
        let blocks = (keys * BITS_PER_KEY).div_ceil(512).max(1) as usize;
        Filter { blocks: vec![[0; BLOCK_WORDS]; blocks] }
    }

    fn positions(&self, hash: KeyHash) -> (usize, u64) {
        locate(hash, self.blocks.len())
    }

    pub fn insert(&mut self, hash: KeyHash) {
        let (block, mut bits) = self.positions(hash);
        let block = &mut self.blocks[block];
        for _ in 0..PROBES {
            let bit = (bits & 511) as usize;
            block[bit / 64] |= 1 << (bit % 64);
            bits >>= 9;
        }
    }

    pub fn may_contain(&self, hash: KeyHash) -> bool {
        let (block, bits) = self.positions(hash);
        let block = &self.blocks[block];
        holds(|word| block[word], bits)
    }

    pub fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_WORDS * 8
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for block in &self.blocks {
            for word in block {
                out.extend_from_slice(&word.to_le_bytes());
            }
        }
    }

    /// Decodes a filter from the front of `bytes`; returns it and the bytes after it.
    pub fn decode(bytes: &[u8]) -> Option<(Filter, &[u8])> {
        let count = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
        // A filter has at least one block (`with_capacity`): a lookup indexes one.
        if count == 0 {
            return None;
        }
        let body = bytes.get(8..count.checked_mul(BLOCK_WORDS * 8)?.checked_add(8)?)?;
        let blocks = body
            .chunks_exact(BLOCK_WORDS * 8)
            .map(|chunk| {
                std::array::from_fn(|w| u64::from_le_bytes(chunk[w * 8..w * 8 + 8].try_into().unwrap()))
            })
            .collect();
        Some((Filter { blocks }, &bytes[8 + body.len()..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> [u8; 16] {
        (n as u128 * 0x1_0000_0001).to_be_bytes()
    }

    #[test]
    fn no_false_negatives_and_few_false_positives_and_a_round_trip() {
        let mut filter = Filter::with_capacity(10_000);
        for n in 0..10_000 {
            filter.insert(KeyHash::of(&key(n)));
        }
        let mut encoded = Vec::new();
        filter.encode_into(&mut encoded);
        encoded.push(7);
        let (filter, rest) = Filter::decode(&encoded).unwrap();
        assert_eq!(rest, &[7]);
        assert!((0..10_000).all(|n| filter.may_contain(KeyHash::of(&key(n)))));
        let false_positives = (10_000..110_000).filter(|n| filter.may_contain(KeyHash::of(&key(*n)))).count();
        assert!(false_positives < 3_000, "{false_positives} false positives in 100,000");
    }
}
