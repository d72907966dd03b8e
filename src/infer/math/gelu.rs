//! The tanh GELU (`gelu_pytorch_tanh`: Gemma's MLP) as candle's
//! `Gelu::f32` computes it, `0.5 v (1 + tanh(sqrt(2/pi) v (1 + 0.044715
//! v^2)))`, with its `tanhf`: [`tanhf`] and [`expm1f`] are fdlibm's, as
//! glibc 2.36 builds them for x86-64 (SSE, no fused multiply-add),
//! checked against it on all 2^32 floats. The AVX2 version runs
//! the same operations in eight lanes, each branch computed and chosen by
//! mask.

use std::mem::MaybeUninit;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const TINY: f32 = 1.0e-30;
const HUGE: f32 = 1.0e30;
const O_THRESHOLD: f32 = f32::from_bits(0x42b1_7180);
const LN2_HI: f32 = f32::from_bits(0x3f31_7180);
const LN2_LO: f32 = f32::from_bits(0x3717_f7d1);
const INVLN2: f32 = f32::from_bits(0x3fb8_aa3b);
/// expm1f's polynomial, Q1 to Q5.
const Q: [f32; 5] = [
    f32::from_bits(0xbd08_8889),
    f32::from_bits(0x3ad0_0d01),
    f32::from_bits(0xb8a6_70cd),
    f32::from_bits(0x3686_7e54),
    f32::from_bits(0xb457_edbb),
];

/// candle's `Gelu::f32`, operation for operation, with [`tanhf`].
#[inline(always)]
pub fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + tanhf(SQRT_TWO_OVER_PI * v * (1.0 + 0.044715 * v * v)))
}

/// [`gelu`] of every value of `x` into `out`, eight at a time where the CPU
/// has AVX2.
pub fn gelu_into(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len(), "gelu: one output per input");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the features each version is compiled for.
    let done = if is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx2") {
        unsafe { avx512vl::gelu_into(x, out) }
    } else if is_x86_feature_detected!("avx2") {
        unsafe { avx2::gelu_into(x, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        o.write(gelu(v));
    }
}

/// fdlibm's `tanhf`.
pub fn tanhf(x: f32) -> f32 {
    let jx = x.to_bits();
    let ix = jx & 0x7fff_ffff;
    let positive = jx >> 31 == 0;
    if ix >= 0x7f80_0000 {
        // tanh(+-inf) = +-1, tanh(NaN) = NaN.
        return if positive { 1.0 / x + 1.0 } else { 1.0 / x - 1.0 };
    }
    let z = if ix < 0x41b0_0000 {
        // |x| < 22
        if ix == 0 {
            return x;
        }
        if ix < 0x2400_0000 {
            // |x| < 2^-55
            return x * (1.0 + x);
        }
        if ix >= 0x3f80_0000 {
            let t = expm1f(x.abs() + x.abs());
            1.0 - 2.0 / (t + 2.0)
        } else {
            let t = expm1f(-2.0 * x.abs());
            -t / (t + 2.0)
        }
    } else {
        1.0 - TINY
    };
    if positive { z } else { -z }
}

/// fdlibm's `expm1f` (`errno` aside: an overflow returns infinity).
pub fn expm1f(x: f32) -> f32 {
    let bits = x.to_bits();
    let negative = bits >> 31 != 0;
    let hx = bits & 0x7fff_ffff;
    if hx >= 0x4195_b844 {
        // |x| >= 27 ln2
        if hx >= 0x42b1_7218 {
            if hx > 0x7f80_0000 {
                return x + x;
            }
            if hx == 0x7f80_0000 {
                return if negative { -1.0 } else { x };
            }
            if x > O_THRESHOLD {
                return HUGE * HUGE;
            }
        }
        if negative {
            return TINY - 1.0;
        }
    }
    let (x, c, k) = if hx > 0x3eb1_7218 {
        // |x| > ln2 / 2: x = k ln2 + (hi - lo).
        let (hi, lo, k) = if hx < 0x3f85_1592 {
            if negative { (x + LN2_HI, -LN2_LO, -1) } else { (x - LN2_HI, LN2_LO, 1) }
        } else {
            let k = (INVLN2 * x + if negative { -0.5 } else { 0.5 }) as i32;
            let t = k as f32;
            (x - t * LN2_HI, t * LN2_LO, k)
        };
        let r = hi - lo;
        (r, (hi - r) - lo, k)
    } else if hx < 0x3300_0000 {
        // |x| < 2^-25: fdlibm's `x - ((huge + x) - (huge + x))`.
        return x;
    } else {
        (x, 0.0, 0)
    };
    let hfx = 0.5 * x;
    let hxs = x * hfx;
    let r1 = 1.0 + hxs * (Q[0] + hxs * (Q[1] + hxs * (Q[2] + hxs * (Q[3] + hxs * Q[4]))));
    let t = 3.0 - r1 * hfx;
    let e = hxs * ((r1 - t) / (6.0 - x * t));
    if k == 0 {
        return x - (x * e - hxs);
    }
    let e = (x * (e - c) - c) - hxs;
    let scaled = |y: f32| f32::from_bits(y.to_bits().wrapping_add((k << 23) as u32));
    match k {
        -1 => 0.5 * (x - e) - 0.5,
        1 if x < -0.25 => -2.0 * (e - (x + 0.5)),
        1 => 1.0 + 2.0 * (x - e),
        ..=-2 | 57.. => scaled(1.0 - (e - x)) - 1.0,
        ..23 => scaled(f32::from_bits(0x3f80_0000 - (0x0100_0000 >> k)) - (e - x)),
        _ => scaled((x - (e + f32::from_bits(((0x7f - k) << 23) as u32))) + 1.0),
    }
}

/// The AVX2 version, compiled once for AVX2 and once more where AVX-512VL
/// lets the same 8-lane code choose lanes by mask register (a `vblendmps`
/// rather than a three-uop `vblendvps`) with twice the registers.
#[cfg(target_arch = "x86_64")]
macro_rules! lanes {
    ($name:ident, $features:literal) => {
        mod $name {
            use super::*;
            use std::arch::x86_64::*;

            /// [`super::gelu`] of whole groups of eight; returns how many values it wrote.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gelu_into(x: &[f32], out: &mut [MaybeUninit<f32>]) -> usize {
                let whole = x.len() / 8 * 8;
                for i in (0..whole).step_by(8) {
                    // SAFETY: i + 8 <= len of both.
                    unsafe {
                        let v = _mm256_loadu_ps(x.as_ptr().add(i));
                        let k = _mm256_set1_ps;
                        let inner = _mm256_mul_ps(
                            _mm256_mul_ps(k(SQRT_TWO_OVER_PI), v),
                            _mm256_add_ps(k(1.0), _mm256_mul_ps(_mm256_mul_ps(k(0.044715), v), v)),
                        );
                        let g = _mm256_mul_ps(_mm256_mul_ps(k(0.5), v), _mm256_add_ps(k(1.0), tanhf(inner)));
                        _mm256_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, g);
                    }
                }
                whole
            }

            /// `if mask { a } else { b }`, lane by lane.
            #[target_feature(enable = $features)]
            #[inline]
            fn pick(mask: __m256i, a: __m256, b: __m256) -> __m256 {
                _mm256_blendv_ps(b, a, _mm256_castsi256_ps(mask))
            }

            /// Lanes whose `a > b` as signed integers (the bits of |x| compare as
            /// the values do).
            #[target_feature(enable = $features)]
            #[inline]
            fn above(a: __m256i, b: i32) -> __m256i {
                _mm256_cmpgt_epi32(a, _mm256_set1_epi32(b))
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn below(a: __m256i, b: i32) -> __m256i {
                _mm256_cmpgt_epi32(_mm256_set1_epi32(b), a)
            }

            /// [`super::tanhf`] in eight lanes.
            #[target_feature(enable = $features)]
            #[inline]
            fn tanhf(x: __m256) -> __m256 {
                let k = _mm256_set1_ps;
                let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
                let ax = _mm256_andnot_ps(sign, x);
                let ix = _mm256_castps_si256(ax);
                let wide = below(ix, 0x3f80_0000);
                // expm1f(2|x|) for |x| >= 1, expm1f(-2|x|) below.
                let t = expm1f(pick(wide, _mm256_mul_ps(k(-2.0), ax), _mm256_add_ps(ax, ax)));
                // -t / (t + 2) below 1, 1 - 2 / (t + 2) above: one division.
                let q = _mm256_div_ps(pick(wide, _mm256_xor_ps(t, sign), k(2.0)), _mm256_add_ps(t, k(2.0)));
                let z = pick(wide, q, _mm256_sub_ps(k(1.0), q));
                let z = pick(above(ix, 0x41af_ffff), k(1.0 - TINY), z);
                // The sign of x, on |x|'s result.
                let z = _mm256_or_ps(_mm256_andnot_ps(sign, z), _mm256_and_ps(sign, x));
                let z = pick(below(ix, 0x2400_0000), _mm256_mul_ps(x, _mm256_add_ps(k(1.0), x)), z);
                // 0 (either sign) stays itself.
                let z = pick(_mm256_cmpeq_epi32(ix, _mm256_setzero_si256()), x, z);
                // +-inf: 1 / x +- 1 is +-1; NaN: 1 / x +- 1 is x, quieted, as
                // x + x makes it. No division.
                let unit = _mm256_or_ps(k(1.0), _mm256_and_ps(sign, x));
                let infinite = pick(above(ix, 0x7f80_0000), _mm256_add_ps(x, x), unit);
                pick(above(ix, 0x7f7f_ffff), infinite, z)
            }

            /// [`super::expm1f`] in eight lanes, for finite `|x| < 88.7` (tanhf's
            /// arguments are under 44).
            #[target_feature(enable = $features)]
            #[inline]
            fn expm1f(x: __m256) -> __m256 {
                let k = _mm256_set1_ps;
                let i = _mm256_set1_epi32;
                let sign = _mm256_castsi256_ps(i(i32::MIN));
                let hx = _mm256_castps_si256(_mm256_andnot_ps(sign, x));
                let negative = _mm256_srai_epi32(_mm256_castps_si256(x), 31);
                // Reduction: |x| in (ln2/2, 1.5 ln2) takes k = +-1; beyond, k from
                // x / ln2 rounded away from 0 by a half and truncated.
                let one_ln2 = below(hx, 0x3f85_1592);
                let kr =
                    _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(k(INVLN2), x), pick(negative, k(-0.5), k(0.5))));
                let kn = pick(one_ln2, _mm256_castsi256_ps(_mm256_or_si256(negative, i(1))), _mm256_castsi256_ps(kr));
                let kn = _mm256_castps_si256(kn);
                let t = _mm256_cvtepi32_ps(kn);
                let hi = pick(
                    one_ln2,
                    pick(negative, _mm256_add_ps(x, k(LN2_HI)), _mm256_sub_ps(x, k(LN2_HI))),
                    _mm256_sub_ps(x, _mm256_mul_ps(t, k(LN2_HI))),
                );
                let lo = pick(one_ln2, pick(negative, k(-LN2_LO), k(LN2_LO)), _mm256_mul_ps(t, k(LN2_LO)));
                let r = _mm256_sub_ps(hi, lo);
                let reduced = above(hx, 0x3eb1_7218);
                let xr = pick(reduced, r, x);
                let c = pick(reduced, _mm256_sub_ps(_mm256_sub_ps(hi, r), lo), k(0.0));
                let kn = _mm256_and_si256(reduced, kn);
                let x = xr;

                let hfx = _mm256_mul_ps(k(0.5), x);
                let hxs = _mm256_mul_ps(x, hfx);
                let mut p = _mm256_mul_ps(hxs, k(Q[4]));
                for q in [Q[3], Q[2], Q[1], Q[0]] {
                    p = _mm256_mul_ps(hxs, _mm256_add_ps(k(q), p));
                }
                let r1 = _mm256_add_ps(k(1.0), p);
                let t = _mm256_sub_ps(k(3.0), _mm256_mul_ps(r1, hfx));
                let e =
                    _mm256_mul_ps(hxs, _mm256_div_ps(_mm256_sub_ps(r1, t), _mm256_sub_ps(k(6.0), _mm256_mul_ps(x, t))));
                let k0 = _mm256_sub_ps(x, _mm256_sub_ps(_mm256_mul_ps(x, e), hxs));
                let e = _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(x, _mm256_sub_ps(e, c)), c), hxs);
                let e_x = _mm256_sub_ps(e, x);
                let shift = _mm256_slli_epi32(kn, 23);
                let scaled = |y: __m256| _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), shift));
                let minus1 = _mm256_sub_ps(_mm256_mul_ps(k(0.5), _mm256_sub_ps(x, e)), k(0.5));
                let plus1 = pick(
                    _mm256_castps_si256(_mm256_cmp_ps(x, k(-0.25), _CMP_LT_OQ)),
                    _mm256_mul_ps(k(-2.0), _mm256_sub_ps(e, _mm256_add_ps(x, k(0.5)))),
                    _mm256_add_ps(k(1.0), _mm256_mul_ps(k(2.0), _mm256_sub_ps(x, e))),
                );
                let far = _mm256_sub_ps(scaled(_mm256_sub_ps(k(1.0), e_x)), k(1.0));
                let t = _mm256_castsi256_ps(_mm256_sub_epi32(i(0x3f80_0000), _mm256_srlv_epi32(i(0x0100_0000), kn)));
                let near = scaled(_mm256_sub_ps(t, e_x));
                let t = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(i(0x7f), kn), 23));
                let mid = scaled(_mm256_add_ps(_mm256_sub_ps(x, _mm256_add_ps(e, t)), k(1.0)));

                let is = |v: i32| _mm256_cmpeq_epi32(kn, i(v));
                let y = pick(below(kn, 23), near, mid);
                let y = pick(_mm256_or_si256(below(kn, -1), above(kn, 56)), far, y);
                let y = pick(is(1), plus1, y);
                let y = pick(is(-1), minus1, y);
                let y = pick(is(0), k0, y);
                let y = pick(below(hx, 0x3300_0000), x, y);
                // x <= -27 ln2: -1.
                pick(_mm256_and_si256(negative, above(hx, 0x4195_b843)), k(TINY - 1.0), y)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
lanes!(avx2, "avx2");
#[cfg(target_arch = "x86_64")]
lanes!(avx512vl, "avx2,avx512f,avx512vl");

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// The floats, and the edges of every branch.
    fn sample() -> Vec<f32> {
        floats(&[
            0x41b0_0000,
            0x41af_ffff,
            0x2400_0000,
            0x23ff_ffff,
            0x3f80_0000,
            0x3f7f_ffff,
            0x3eb1_7218,
            0x3eb1_7219,
            0x3f85_1592,
            0x3f85_1591,
            0x3300_0000,
            0x32ff_ffff,
            0x4195_b844,
        ])
    }

    /// The port reproduces glibc 2.36's tanhf (Debian 12, x86-64) on the
    /// sample, whatever this machine's libm.
    #[test]
    fn tanhf_is_glibcs() {
        assert_eq!(digest(sample().into_iter().map(|x| tanhf(x).to_bits().to_le_bytes())), TANHF_DIGEST);
    }

    /// GELU eight at a time gives the scalar bits, on the sample and on
    /// values the MLP sees, in each build this CPU runs (AVX2, and
    /// AVX-512VL where it has it), and through the dispatch with its
    /// scalar tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lanes_give_the_scalar_bits() {
        assert_lanes_run();
        let mut x = sample();
        x.extend((0..100_003).map(|i| (i as f32 - 50_000.0) / 997.0));
        assert_ne!(x.len() % 8, 0);
        let check = |build: &str, run: &dyn Fn(&mut [MaybeUninit<f32>]) -> usize, whole: usize| {
            let mut out = vec![MaybeUninit::uninit(); x.len()];
            assert_eq!(run(&mut out), whole, "{build}: values written");
            for (i, (o, &v)) in out[..whole].iter().zip(&x).enumerate() {
                // SAFETY: the build wrote the first `whole` values.
                let got = unsafe { o.assume_init() };
                assert_eq!(got.to_bits(), gelu(v).to_bits(), "{build}, value {i}: gelu({v:e} = {:#x})", v.to_bits());
            }
        };
        // SAFETY (both builds): the CPU has the features each is compiled for.
        check("AVX2", &|out| unsafe { avx2::gelu_into(&x, out) }, x.len() / 8 * 8);
        if std::arch::is_x86_feature_detected!("avx512vl") && std::arch::is_x86_feature_detected!("avx2") {
            check("AVX-512VL", &|out| unsafe { avx512vl::gelu_into(&x, out) }, x.len() / 8 * 8);
        } else {
            eprintln!("SKIPPED the AVX-512VL build of the GELU lanes: this CPU lacks it");
        }
        check(
            "dispatch",
            &|out| {
                gelu_into(&x, out);
                x.len()
            },
            x.len(),
        );
    }

    /// glibc 2.36's tanhf on [`sample`], digested as the test does (the port
    /// and that libm also agree on all 2^32 floats).
    const TANHF_DIGEST: &str = "e46868593f9f2d5425b1d96ed7268bcdb88aa295db3f61ce650976450abed20e";
}
