//! `expf`, for SiLU (`x / (1 + exp(-x))`: Llama, Qwen, Mistral, SmolLM2's
//! MLP) and the attention softmax.
//!
//! [`expf`] is ARM's optimized-routines `expf` (glibc's since 2.27) as
//! glibc 2.36 builds it for x86-64 CPUs with FMA, `__expf_fma`: in double
//! precision, fused where that build fuses, rounded to float once; checked
//! against it on all 2^32 floats. [`silu_into`] runs it eight lanes at a
//! time on AVX2 with FMA.

use std::mem::MaybeUninit;

/// `exp(x) = 2^(k/N) 2^(r/N)`, with a table of `2^(i/N)`.
const N: u64 = 32;
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// Rounds `x / ln2 * N` to an integer in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
const C: [f64; 3] = [
    f64::from_bits(0x3ebc_6af8_4b91_2394),
    f64::from_bits(0x3f2e_bfce_50fa_c4f3),
    f64::from_bits(0x3f96_2e42_ff0c_52d6),
];
/// `2^(i/32)`'s bits less `i << 47`: [`exp`](super::exp)'s table holds it,
/// as `2^(4i/128)`'s bits less `4i << 45`.
fn table(i: u64) -> u64 {
    super::exp::T[8 * i as usize + 1]
}

/// The main path takes float exponent fields up to this (`|x| < 88`).
const TOP: u32 = 0x42a;

/// exp(x).
pub fn expf(x: f32) -> f32 {
    if (x.to_bits() >> 20) & 0x7ff > TOP {
        if x == f32::NEG_INFINITY {
            return 0.0;
        }
        if (x.to_bits() >> 20) & 0x7ff > 0x7f7 {
            // +infinity and NaN.
            return x + x;
        }
        if x > f32::from_bits(0x42b1_7217) {
            return f32::INFINITY;
        }
        if x < f32::from_bits(0xc2cf_f1b4) {
            return 0.0;
        }
        if x < f32::from_bits(0xc2ce_8ecf) {
            // Rounds to the least subnormal.
            return f32::from_bits(1);
        }
    }
    let xd = x as f64;
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(table(ki % N).wrapping_add(ki << 47));
    let y = C[0].mul_add(r, C[1]).mul_add(r * r, C[2].mul_add(r, 1.0));
    (y * s) as f32
}

/// candle's `Silu::f32`, operation for operation, with [`expf`].
#[inline(always)]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + expf(-v))
}

/// [`silu`] of every value of `x` into `out`, eight at a time where the CPU
/// has AVX2 and FMA.
pub fn silu_into(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len(), "silu: one output per input");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX2 and FMA.
    let done = if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        unsafe { avx2::silu_into(x, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        o.write(silu(v));
    }
}

/// [`expf`] of every value, in place, eight at a time where the CPU has
/// AVX2 and FMA.
pub fn exp_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX2 and FMA.
    let done = if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        unsafe { avx2::exp_in_place(values) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for v in &mut values[done..] {
        *v = expf(*v);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::silu`] of whole groups of eight; returns how many values it wrote.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_into(x: &[f32], out: &mut [MaybeUninit<f32>]) -> usize {
        let whole = x.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= len of both.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            let e = expf8(_mm256_xor_ps(v, _mm256_set1_ps(-0.0)));
            let s = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, s) };
        }
        whole
    }

    /// [`super::expf`] of whole groups of eight, in place; returns how many.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(values: &mut [f32]) -> usize {
        let whole = values.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= values.len().
            unsafe {
                let at = values.as_mut_ptr().add(i);
                _mm256_storeu_ps(at, expf8(_mm256_loadu_ps(at)));
            }
        }
        whole
    }

    /// [`super::expf`] in eight lanes: the main path in double, or the
    /// scalar code for all eight when a lane is outside it.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn expf8(x: __m256) -> __m256 {
        let top = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 20), _mm256_set1_epi32(0x7ff));
        if _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(top, _mm256_set1_epi32(TOP as i32)))) == 0 {
            let low = expf(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
            let high = expf(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
            return _mm256_set_m128(_mm256_cvtpd_ps(high), _mm256_cvtpd_ps(low));
        }
        let mut m = [0f32; 8];
        // SAFETY: m holds eight, as does e below.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), x) };
        let e = m.map(super::expf);
        unsafe { _mm256_loadu_ps(e.as_ptr()) }
    }

    /// [`super::expf`]'s main path in four lanes, on floats widened to double.
    #[target_feature(enable = "avx2,fma")]
    fn expf(xd: __m256d) -> __m256d {
        let k = _mm256_set1_pd;
        let kd = _mm256_fmadd_pd(k(INV_LN2_N), xd, k(SHIFT));
        let ki = _mm256_castpd_si256(kd);
        let kd = _mm256_sub_pd(kd, k(SHIFT));
        let r = _mm256_fmsub_pd(k(INV_LN2_N), xd, kd);
        // [`table`]: entry 8i + 1 of exp's.
        let idx = _mm256_slli_epi64(_mm256_and_si256(ki, _mm256_set1_epi64x(N as i64 - 1)), 3);
        // SAFETY: 8i + 1 < 256, the table's length.
        let t = unsafe { _mm256_i64gather_epi64::<8>(super::super::exp::T.as_ptr().add(1) as *const i64, idx) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64(ki, 47)));
        let y = _mm256_fmadd_pd(
            _mm256_fmadd_pd(k(C[0]), r, k(C[1])),
            _mm256_mul_pd(r, r),
            _mm256_fmadd_pd(k(C[2]), r, k(1.0)),
        );
        _mm256_mul_pd(y, s)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// The floats, and the edges of every branch.
    fn sample() -> Vec<f32> {
        floats(&[
            0x42b1_7217,
            0x42b1_7218,
            0x42cf_f1b4,
            0x42cf_f1b5,
            0x42ce_8ecf,
            0x42ce_8ed0,
            0x42b0_0000,
            0x42af_ffff,
        ])
    }

    /// The port reproduces glibc 2.36's `__expf_fma` (Debian 12, x86-64) on
    /// the sample, whatever this machine's libm.
    #[test]
    fn expf_is_glibcs() {
        assert_eq!(digest(sample().into_iter().map(|x| expf(x).to_bits().to_le_bytes())), EXPF_DIGEST);
    }

    /// SiLU and expf eight at a time give the scalar bits, on the sample (whose
    /// groups of eight reach the scalar fallback) and on values the MLP
    /// sees, with a scalar tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lanes_give_the_scalar_bits() {
        assert_lanes_run();
        let mut x: Vec<f32> = (0..100_000).map(|i| (i as f32 - 50_000.0) / 997.0).collect();
        x.extend(sample());
        assert_ne!(x.len() % 8, 0);
        let mut out = vec![MaybeUninit::uninit(); x.len()];
        silu_into(&x, &mut out);
        let mut e = x.clone();
        exp_in_place(&mut e);
        for (i, ((o, &v), &e)) in out.iter().zip(&x).zip(&e).enumerate() {
            // SAFETY: silu_into wrote every value.
            let got = unsafe { o.assume_init() };
            assert_eq!(got.to_bits(), silu(v).to_bits(), "value {i}: silu({v:e} = {:#x})", v.to_bits());
            assert_eq!(e.to_bits(), expf(v).to_bits(), "value {i}: expf({v:e} = {:#x})", v.to_bits());
        }
    }

    /// glibc 2.36's `__expf_fma` on [`sample`], digested as the test does.
    const EXPF_DIGEST: &str = "c881fd8d4a6a59dc0fbf13928cfaa6a7c3312f03e1bf77ce7d9333d584d88a04";
}
