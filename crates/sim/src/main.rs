//! Soak runner: `cargo run -p mars-sim --release -- --seeds N --steps M [--first S]`, or
//! `--seed S` to replay one seed and print its whole trace. Prints seeds per second and stops
//! at the first failing seed with its trace.

use std::process::ExitCode;
use std::time::Instant;

use mars_sim::{run, SimConfig};

/// Where a switch lives in the configuration.
type Field = fn(&mut SimConfig) -> &mut bool;

/// The [`SimConfig`] switches by their command-line names (`--NAME`).
const SWITCHES: [(&str, Field); 12] = [
    ("skip-chain-check", |c| &mut c.skip_chain_check),
    ("planned-promotion-ignores-others", |c| {
        &mut c.planned_promotion_ignores_others
    }),
    ("sync-serves-unsynced-data", |c| {
        &mut c.sync_serves_unsynced_data
    }),
    ("replace-replayed-empty-copy", |c| {
        &mut c.replace_replayed_empty_copy
    }),
    ("sync-survives-source-change", |c| {
        &mut c.sync_survives_source_change
    }),
    ("sync-adopts-primary-link-later", |c| {
        &mut c.sync_adopts_primary_link_later
    }),
    ("caught-up-survives-source-change", |c| {
        &mut c.caught_up_survives_source_change
    }),
    ("complete-by-link-lengths-only", |c| {
        &mut c.complete_by_link_lengths_only
    }),
    ("fetch-request-without-history", |c| {
        &mut c.fetch_request_without_history
    }),
    ("link-reclaim-uses-published-pin", |c| {
        &mut c.link_reclaim_uses_published_pin
    }),
    ("fetch-without-tail", |c| &mut c.fetch_without_tail),
    ("serve-non-members", |c| &mut c.serve_non_members),
];

fn switch_of<'a>(cfg: &'a mut SimConfig, arg: &str) -> Option<&'a mut bool> {
    let name = arg.strip_prefix("--")?;
    let (_, field) = SWITCHES.iter().find(|(n, _)| *n == name)?;
    Some(field(cfg))
}

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
            other => {
                if let Some(flag) = switch_of(&mut cfg, other) {
                    *flag = true;
                    continue;
                }
                eprintln!(
                    "unknown argument {other}; usage: mars-sim [--seeds N] [--steps M] \
                     [--first S] [--seed S] [{}]",
                    SWITCHES
                        .iter()
                        .map(|(name, _)| format!("--{name}"))
                        .collect::<Vec<_>>()
                        .join("] [")
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
        if done.is_multiple_of(100) || done == seeds {
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
