use super::*;
use crate::infer::test_values as values;
use candle_core::{Device, Tensor};

/// The 32-weight block types, and the K-quants (256-weight super-blocks).
const TYPES: [GgmlDType; 5] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0];
const K_TYPES: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

fn all_types() -> impl Iterator<Item = GgmlDType> {
    TYPES.into_iter().chain(K_TYPES)
}

/// The kernels this CPU runs; those it cannot are named on the terminal
/// (not through the harness's capture, which hides it).
fn kernels_here(what: &str) -> Vec<Kernel> {
    use std::io::Write;
    #[cfg(target_arch = "x86_64")]
    if Kernel::AvxVnni.runs_here() && !is_x86_feature_detected!("avxvnni") {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {what} on avx-vnni's VEX encoding: this CPU lacks AVX-VNNI (its EVEX encoding runs)"
        );
    }
    Kernel::ALL
        .into_iter()
        .filter(|k| {
            if !k.runs_here() {
                let _ = writeln!(std::io::stderr(), "SKIPPED {what} on {}: this CPU lacks its instructions", k.name());
            }
            k.runs_here()
        })
        .collect()
}

fn run(q: &QTensor, kernel: Kernel, x: &[f32]) -> Vec<f32> {
    let p = PackedMatrix::new(q, kernel).unwrap().expect("a packed type");
    let mut out = vec![0.0; x.len() / p.k * p.n];
    p.matmul(x, &mut out);
    out
}

/// Activations with the cases quantization must agree on: a zero block,
/// a block of one value, halves that round to even, huge and tiny values.
fn awkward_activations(m: usize, k: usize) -> Vec<f32> {
    let mut x = values(m * k, 2);
    x[..BLOCK].fill(0.0);
    x[BLOCK..2 * BLOCK].fill(-3.5);
    for (j, v) in x[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
        *v = (j as f32 - 16.0) * 0.5 / 127.0 * 16.0;
    }
    for v in &mut x[3 * BLOCK..4 * BLOCK] {
        *v *= 1e30;
    }
    for v in &mut x[4 * BLOCK..5 * BLOCK] {
        *v *= 1e-30;
    }
    x
}

/// Every kernel gives the scalar reference's bits: every packed type, a
/// partial last tile (37 rows: a full half and 5 columns of the next), row
/// groups of 4 and of 8 with every kind of tail, and a prefill batch split
/// across work items.
#[test]
fn every_kernel_computes_the_reference_bits() {
    let (n, k) = (37, 512);
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).unwrap();
    let kernels = kernels_here("the kernel-against-reference test");
    for m in [1, 3, 7, 13, 70] {
        let x = awkward_activations(m, k);
        for dtype in all_types() {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = run(&q, Kernel::Scalar, &x);
            for &kernel in &kernels {
                let got = run(&q, kernel, &x);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{dtype:?} on {}: output ({}, {}) is {g}, the reference's {w}",
                        kernel.name(),
                        i / n,
                        i % n
                    );
                }
            }
        }
    }
}

/// The kernels' integer sums stay within their registers on the largest
/// products: weights at the ends of their ranges against blocks of one
/// sign (every int8 at 127, or at -127), where summing more products than
/// a kernel's bound allows would saturate or wrap.
#[test]
fn the_largest_products_do_not_overflow() {
    let (n, k) = (32, 512);
    let w: Vec<f32> = (0..n * k)
        .map(|i| {
            let (r, c) = (i / k, i % k);
            match r % 4 {
                0 => 1.0,
                1 => -1.0,
                2 if c % 32 < 16 => 1.0,
                2 => -1.0,
                _ => [1.0, -0.5, 0.25, -1.0][c % 4],
            }
        })
        .collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..3 * k).map(|i| [3.5, -3.5, if i % 2 == 0 { 3.5 } else { -3.5 }][i / k]).collect();
    for dtype in all_types() {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let want = run(&q, Kernel::Scalar, &x);
        for kernel in kernels_here("the overflow test") {
            let got = run(&q, kernel, &x);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?} on {}", kernel.name());
        }
    }
}

/// Matrices run together ([`matmuls`]: q, k and v; gate and up) give each
/// one's own outputs, side by side: different types (and so different
/// extra activation sums), partial tiles, and a prefill batch.
#[test]
fn fused_matrices_give_each_ones_outputs() {
    let k = 512;
    let parts: Vec<QTensor> =
        [(GgmlDType::Q5_0, 37), (GgmlDType::Q8_0, 16), (GgmlDType::Q6K, 21), (GgmlDType::Q4_1, 5)]
            .iter()
            .enumerate()
            .map(|(i, &(dtype, n))| {
                let w = Tensor::from_vec(values(n * k, 10 + i as u64), (n, k), &Device::Cpu).unwrap();
                QTensor::quantize(&w, dtype).unwrap()
            })
            .collect();
    for kernel in kernels_here("the fused-matrices test") {
        let packed: Vec<PackedMatrix> = parts.iter().map(|q| PackedMatrix::new(q, kernel).unwrap().unwrap()).collect();
        let refs: Vec<&PackedMatrix> = packed.iter().collect();
        let n: usize = packed.iter().map(|p| p.n).sum();
        for m in [1, 70] {
            let x = awkward_activations(m, k);
            let mut all = vec![f32::NAN; m * n];
            matmuls(&refs, &x, super::super::dense::written(&mut all));
            let mut col = 0;
            for (p, q) in packed.iter().zip(&parts) {
                let alone = run(q, kernel, &x);
                for r in 0..m {
                    let got: Vec<u32> = all[r * n + col..][..p.n].iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = alone[r * p.n..][..p.n].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{:?} on {}, row {r}", q.dtype(), kernel.name());
                }
                col += p.n;
            }
        }
    }
}

/// The reference against an f32 matmul of the file's (dequantized)
/// weights: the only difference is the activations' int8 rounding.
#[test]
fn the_reference_matches_the_dequantized_weights() {
    let dev = Device::Cpu;
    let (n, k, m) = (40, 256, 7);
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &dev).unwrap();
    let x = values(m * k, 2);
    for dtype in all_types() {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let exact = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let out = run(&q, Kernel::Scalar, &x);
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            // int8 activations: each is off by at most half a step, 1/254 of its block's largest.
            let step: Vec<f32> = row
                .chunks(BLOCK)
                .flat_map(|b| {
                    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                    std::iter::repeat_n(amax / 254.0, BLOCK)
                })
                .collect();
            for j in 0..n {
                let want: f32 = (0..k).map(|c| row[c] * exact[j][c]).sum();
                let bound: f32 = (0..k).map(|c| exact[j][c].abs() * step[c]).sum::<f32>() * 1.01 + 1e-5;
                let got = out[i * n + j];
                assert!((got - want).abs() <= bound, "{dtype:?} ({i}, {j}): {got} vs {want} (bound {bound})");
            }
        }
    }
}

/// AVX2's quantization of activations gives the scalar code's bits, on the
/// awkward blocks and on blocks holding an infinity or a NaN.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_quantizes_as_the_reference_does() {
    if !kernels_here("the quantization test").contains(&Kernel::Avx2) {
        return;
    }
    let mut x = awkward_activations(2, 8 * BLOCK);
    x[5 * BLOCK + 3] = f32::INFINITY;
    x[6 * BLOCK + 7] = f32::NAN;
    x[7 * BLOCK..8 * BLOCK].fill(f32::NEG_INFINITY);
    let blocks = x.len() / BLOCK;
    let quantized = |avx2: bool| {
        let (mut q, mut d, mut s, mut sum) = (vec![0; x.len()], vec![0.0; blocks], vec![0.0; blocks], vec![0; blocks]);
        match avx2 {
            // SAFETY: the CPU has AVX2 (checked above).
            true => unsafe { avx2::quantize(&x, &mut q, &mut d, &mut s, &mut sum) },
            false => reference::quantize(&x, &mut q, &mut d, &mut s, &mut sum),
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        (q, bits(d), bits(s), sum)
    };
    assert_eq!(quantized(true), quantized(false));
}

/// A row's outputs are the same bits alone or among other rows, on every
/// kernel.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let (n, k, m) = (48, 256, 9);
    let w = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu).unwrap();
    let x = values(m * k, 4);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q6K] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        for kernel in kernels_here("the batch-invariance test") {
            let all = run(&q, kernel, &x);
            for i in 0..m {
                let alone = run(&q, kernel, &x[i * k..(i + 1) * k]);
                assert_eq!(alone, all[i * n..(i + 1) * n], "{dtype:?} on {} row {i}", kernel.name());
            }
        }
    }
}

/// The reference's bits on fixed blocks of every packed type, as digests
/// made on x86-64 (every kernel there agreed): another architecture's build
/// (aarch64, with its own fused multiply-add and vectorisation; `make
/// test-aarch64`) must give the same, or a shared cache would mix two
/// datasets.
#[test]
fn the_reference_gives_the_same_bits_on_every_architecture() {
    let digest = |types: &[GgmlDType], k: usize| {
        let (n, m) = (37, 7);
        let w = Tensor::from_vec(values(n * k, 5), (n, k), &Device::Cpu).unwrap();
        let x = awkward_activations(m, k);
        let mut hasher = blake3::Hasher::new();
        for &dtype in types {
            for v in run(&QTensor::quantize(&w, dtype).unwrap(), Kernel::Scalar, &x) {
                hasher.update(&v.to_bits().to_le_bytes());
            }
        }
        hasher.finalize().to_hex().to_string()
    };
    assert_eq!(digest(&TYPES, 192), "4beda33225f4cc6a7cd3fb7f97cecd22aa7c1bf43bf2b52e60e1cada6d5e4aa7");
    assert_eq!(digest(&K_TYPES, 512), "23803da331a6186d294d3df2a5f58f021377bc68f0f723ff418a499c5ffacaff");
}
