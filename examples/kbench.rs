use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use prefgen::infer::qmatmul::{Kernel, PackedMatrix};
use std::time::Instant;
fn main() {
    unsafe { prefgen::infer::settle_process() };
    let args: Vec<String> = std::env::args().collect();
    let (n, k): (usize, usize) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    let dt = match args[3].as_str() {
        "q8" => GgmlDType::Q8_0,
        "q4k" => GgmlDType::Q4K,
        "q6k" => GgmlDType::Q6K,
        "q5" => GgmlDType::Q5_0,
        _ => GgmlDType::Q4_1,
    };
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dt).unwrap();
    let p = PackedMatrix::new(&q, Kernel::chosen().unwrap()).unwrap().unwrap();
    for m in std::env::var("MS").unwrap_or("1,8,32,64".into()).split(",").map(|x| x.parse::<usize>().unwrap()) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let mut out = vec![0f32; m * n];
        p.matmul(&x, &mut out);
        let reps = (2_000_000_000 / (m * n * k)).max(3);
        let t = Instant::now();
        for _ in 0..reps {
            p.matmul(&x, &mut out);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("m={m:3} {:.2} ms  {:.1} GMAC/s", s * 1e3, (m * n * k) as f64 / s / 1e9);
    }
}
