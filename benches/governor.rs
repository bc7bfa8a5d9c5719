//! What the ResourceGovernor costs the host: CPU time and wall time per host sample (sysinfo CPU
//! and memory, /proc/stat, three /proc/pressure files, statvfs), the memory the sampler holds, and
//! the policy's decision time. Prints a table.
//!
//! Run: `cargo bench --bench governor` (add `-- --quick` for fewer samples).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use agentlab::config::governor::GovernorTuning;
use agentlab::governor::policy::{Committed, Demand, Policy};
use agentlab::governor::sampler::{HostSampler, Sampler};

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Resident set size of this process (VmRSS in /proc/self/status), KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 50 } else { 500 };
    let storage = Path::new(env!("CARGO_MANIFEST_DIR"));

    let rss_before = rss_kib();
    let started = Instant::now();
    let cpu_before = thread_cpu();
    let mut sampler = HostSampler::new();
    let setup_cpu = thread_cpu() - cpu_before;
    let setup_wall = started.elapsed();
    let rss_after_setup = rss_kib();

    let mut cpu = Vec::with_capacity(n);
    let mut wall = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        // The daemon samples once a second; a short pause keeps CPU deltas meaningful here.
        std::thread::sleep(Duration::from_millis(20));
        let (c0, w0) = (thread_cpu(), Instant::now());
        last = Some(sampler.sample(storage));
        cpu.push(thread_cpu() - c0);
        wall.push(w0.elapsed());
    }
    let rss_after_samples = rss_kib();
    let readings = last.unwrap();

    let tuning = GovernorTuning::default();
    let mut policy = Policy::new(&tuning);
    let demand = Demand {
        vcpus: 1,
        memory_mb: 256,
        disk_gb: 1,
    };
    let mut decide = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        policy.observe(&tuning, &readings);
        std::hint::black_box(policy.decide(&tuning, &readings, &Committed::default(), &demand));
        decide.push(t0.elapsed());
    }

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean_cpu = cpu.iter().sum::<Duration>() / n as u32;
    println!("| governor cost ({n} samples) | p50 | p99 | mean |");
    println!("|---|---|---|---|");
    println!(
        "| CPU per sample | {:.3} ms | {:.3} ms | {:.3} ms |",
        ms(percentile(&mut cpu.clone(), 0.5)),
        ms(percentile(&mut cpu.clone(), 0.99)),
        ms(mean_cpu)
    );
    println!(
        "| wall per sample | {:.3} ms | {:.3} ms | |",
        ms(percentile(&mut wall.clone(), 0.5)),
        ms(percentile(&mut wall.clone(), 0.99))
    );
    println!(
        "| policy observe + decide | {:.4} ms | {:.4} ms | |",
        ms(percentile(&mut decide.clone(), 0.5)),
        ms(percentile(&mut decide.clone(), 0.99))
    );
    println!();
    println!(
        "sampler set-up: {:.1} ms CPU, {:.1} ms wall (reads /proc/cpuinfo once)",
        ms(setup_cpu),
        ms(setup_wall)
    );
    println!(
        "at one sample a second: {:.3}% of one CPU",
        mean_cpu.as_secs_f64() * 100.0
    );
    println!(
        "RSS: {rss_before} KiB before the sampler, {rss_after_setup} KiB after set-up (+{} KiB), \
         {rss_after_samples} KiB after {n} samples (+{} KiB more)",
        rss_after_setup.saturating_sub(rss_before),
        rss_after_samples.saturating_sub(rss_after_setup)
    );
    println!(
        "host: {} cores / {} CPUs, PSI {}",
        readings.cpu.physical_cores,
        readings.cpu.logical_cpus,
        if readings.pressure.is_some() {
            "present"
        } else {
            "absent"
        }
    );
}
