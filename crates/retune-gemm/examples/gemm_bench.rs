//! GFLOP/s of each available kernel on the SmolLM2-135M training shapes (m = 1024 tokens).
//!
//! `cargo run --release -p retune-gemm --example gemm_bench [seconds per case]`

use retune_gemm::{gemm_packed, gemm_with, Kernel, MatRef, PackedB};
use std::time::{Duration, Instant};

/// How an operand pair is laid out, as in `retune_core::ops::matmul`.
#[derive(Clone, Copy)]
enum Layout {
    /// `a[m, k] · w[n, k]^T`: linear forward.
    Nt,
    /// `a[k, m]^T · b[k, n]`: weight gradient.
    Tn,
}

/// Best time of repeated runs of `f` within about `budget`.
fn best_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut best = Duration::MAX;
    let mut runs = 0;
    while runs < 3 || (start.elapsed() < budget && runs < 1000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
        runs += 1;
    }
    best
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        })
        .collect()
}

fn main() {
    let budget = Duration::from_secs_f64(
        std::env::args()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.5),
    );
    let cases: [(&str, Layout, usize, usize, usize); 7] = [
        ("qkv/o  nt", Layout::Nt, 1024, 576, 576),
        ("kv     nt", Layout::Nt, 1024, 576, 192),
        ("up     nt", Layout::Nt, 1024, 576, 1536),
        ("down   nt", Layout::Nt, 1024, 1536, 576),
        ("dW     tn", Layout::Tn, 576, 1024, 576),
        ("dW up  tn", Layout::Tn, 1536, 1024, 576),
        ("lmhead nt", Layout::Nt, 256, 576, 49152),
    ];
    let kernels: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    println!("threads: {}", rayon::current_num_threads());
    print!("{:<10} {:>5} {:>5} {:>6}", "case", "m", "k", "n");
    for k in &kernels {
        print!(
            " {:>11} {:>11}",
            format!("{}", k.name()),
            format!("{}+packed", k.name())
        );
    }
    println!("   (GFLOP/s)");
    for (name, layout, m, k, n) in cases {
        let flops = 2.0 * (m * k * n) as f64;
        let (a_len, b_len) = (m * k, k * n);
        let (a, b) = (values(a_len, 1), values(b_len, 2));
        let (a_view, b_view) = match layout {
            Layout::Nt => (MatRef::row_major(&a, k), MatRef::transpose_of(&b, k)),
            Layout::Tn => (MatRef::transpose_of(&a, m), MatRef::row_major(&b, n)),
        };
        let mut c = vec![0.0f32; m * n];
        print!("{name:<10} {m:>5} {k:>5} {n:>6}");
        for &kernel in &kernels {
            let t = best_time(budget, || {
                gemm_with(kernel, &mut c, a_view, b_view, m, k, n, false)
            });
            let packed = PackedB::with_kernel(kernel, b_view, k, n);
            let tp = best_time(budget, || gemm_packed(&mut c, a_view, &packed, m, false));
            print!(
                " {:>11.0} {:>11.0}",
                flops / t.as_secs_f64() * 1e-9,
                flops / tp.as_secs_f64() * 1e-9
            );
        }
        println!();
    }
}
