//! Soak runner: `cargo run -p mars-sim --release -- --seeds N --steps M [--first S]`, or
//! `--seed S` to replay one seed and print its whole trace. Prints seeds per second and stops
//! at the first failing seed with its trace.

use std::process::ExitCode;
use std::time::Instant;

use mars_sim::{run, SimConfig};

fn main() -> ExitCode {
    let mut seeds = 1000u64;
    let mut steps = 400u64;
    let mut first = 0u64;
    let mut single = None;
    let mut cfg = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match a.as_str() {
            "--seeds" => seeds = num("--seeds"),
            "--steps" => steps = num("--steps"),
            "--first" => first = num("--first"),
            "--seed" => single = Some(num("--seed")),
            "--skip-chain-check" => cfg.skip_chain_check = true,
            "--planned-promotion-ignores-others" => cfg.planned_promotion_ignores_others = true,
            "--sync-serves-unsynced-data" => cfg.sync_serves_unsynced_data = true,
            "--replace-replayed-empty-copy" => cfg.replace_replayed_empty_copy = true,
            "--sync-survives-source-change" => cfg.sync_survives_source_change = true,
            "--sync-adopts-primary-link-later" => cfg.sync_adopts_primary_link_later = true,
            "--caught-up-survives-source-change" => cfg.caught_up_survives_source_change = true,
            other => {
                eprintln!(
                    "unknown argument {other}; usage: mars-sim [--seeds N] [--steps M] \
                     [--first S] [--seed S] [--skip-chain-check] \
                     [--planned-promotion-ignores-others] [--sync-serves-unsynced-data] [--replace-replayed-empty-copy] [--sync-survives-source-change] [--sync-adopts-primary-link-later] [--caught-up-survives-source-change] [--complete-by-link-lengths-only] [--fetch-request-without-history]"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = single {
        let o = run(seed, steps, cfg);
        println!("{}", o.trace.join("\n"));
        println!("{:?}", o.stats);
        return match o.error {
            Some(e) => {
                println!("seed {seed} FAILED: {e}");
                ExitCode::FAILURE
            }
            None => {
                println!("seed {seed} ok");
                ExitCode::SUCCESS
            }
        };
    }
    let t = Instant::now();
    let mut total = mars_sim::Stats::default();
    for seed in first..first + seeds {
        let o = run(seed, steps, cfg.clone());
        if o.error.is_some() {
            println!("{}", o.report(150));
            return ExitCode::FAILURE;
        }
        let s = &o.stats;
        total.writes += s.writes;
        total.flushes += s.flushes;
        total.crashes += s.crashes;
        total.handovers += s.handovers;
        total.failovers += s.failovers;
        total.planned_promotions += s.planned_promotions;
        total.forced_promotions += s.forced_promotions;
        total.invalidates += s.invalidates;
        total.joins += s.joins;
        total.leaves += s.leaves;
        total.settles += s.settles;
        total.settled_with_primary += s.settled_with_primary;
        total.up_to_date_checks += s.up_to_date_checks;
        for (k, v) in &s.end_states {
            *total.end_states.entry(k.clone()).or_insert(0) += v;
        }
        let done = seed - first + 1;
        if done % 100 == 0 || done == seeds {
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{done} seeds x {steps} steps ok in {secs:.1} s: {:.1} seeds/s",
                done as f64 / secs
            );
        }
    }
    println!("{total:?}");
    ExitCode::SUCCESS
}
