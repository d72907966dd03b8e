//! The elementary functions whose bits decide a response, written out here
//! rather than taken from the C library: glibc picks among several builds
//! of them by CPU, is replacing some with correctly rounded ones, and other
//! systems have their own, so a response computed with them could depend
//! on the machine. Each is a port of glibc 2.36's x86-64 build (the same
//! IEEE operations in the same order, fused where that build fuses them),
//! checked against it bit for bit, and each has an AVX2 version that runs
//! the same operations in lanes, several values a call: scalar calls into
//! the C library were a quarter of a Gemma-3 prefill.

pub mod exp;
pub mod expf;
pub mod gelu;

/// What the ports' tests share.
#[cfg(test)]
mod testing {
    /// Every 65,521st float (a prime stride: every exponent, both signs,
    /// many mantissas), the special values, and `edges` (bits) with their
    /// negations.
    pub(super) fn floats(edges: &[u32]) -> Vec<f32> {
        let mut v: Vec<f32> = (0..u32::MAX / 65_521).map(|i| f32::from_bits(i * 65_521)).collect();
        let special = [0.0, f32::INFINITY, f32::NAN, f32::from_bits(1)];
        v.extend(special.into_iter().chain(edges.iter().map(|&b| f32::from_bits(b))).flat_map(|x| [x, -x]));
        v
    }

    /// The BLAKE3 digest of outputs' bytes, in order, as hex.
    pub(super) fn digest<B: AsRef<[u8]>>(outputs: impl IntoIterator<Item = B>) -> String {
        let mut h = blake3::Hasher::new();
        for b in outputs {
            h.update(b.as_ref());
        }
        h.finalize().to_hex().to_string()
    }

    /// Fails unless the CPU has what the AVX2 lanes need: a lanes test must
    /// not pass by testing nothing.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn assert_lanes_run() {
        assert!(
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            "this test checks the AVX2 lanes: it needs AVX2 and FMA"
        );
    }
}
