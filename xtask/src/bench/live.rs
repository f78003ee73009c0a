//! What the data plane's programs cost in live traffic, by the kernel's own run-time accounting
//! (`BPF_ENABLE_STATS`): runs and run time of each program over one more measurement (in every
//! round, or once after the rounds), per run and per transaction.
//!
//! A program's run time covers the program alone: the redirect it asks for, the device hops
//! and the stacks come after it returns. So the programs' time per transaction, set against what
//! a path takes per transaction more than another, splits that difference into the programs'
//! share and everything else's.
//!
//! The accounting adds a clock read to every run's measured time (two per run, one of them
//! inside the measured span), and is on only while its descriptor is held.

use anyhow::{Context as _, Result, bail};

use super::{
    report::{Metric, Scenario, Spread, csv_row},
    traffic::Transactions,
};

/// How much of a program's name the kernel keeps (`BPF_OBJ_NAME_LEN` less the NUL).
const KERNEL_NAME_LEN: usize = 15;

/// A program whose runs are counted, and the packets it runs for on the measured path.
#[derive(Clone, Copy, Debug)]
pub struct Watched {
    pub program: &'static str,
    pub what: &'static str,
}

/// One program's runs and run time over a live measurement.
#[derive(Clone, Debug)]
pub struct LiveCost {
    pub program: &'static str,
    pub what: &'static str,
    pub runs: u64,
    pub ns_per_run: f64,
    /// Runs per transaction of the measurement (all of them, its warm-up included).
    pub runs_per_transaction: f64,
}

impl LiveCost {
    pub fn ns_per_transaction(&self) -> f64 {
        self.ns_per_run * self.runs_per_transaction
    }
}

/// One measurement with the accounting on, or the median of several (see [`merge_rounds`]).
#[derive(Clone, Debug)]
pub struct Account {
    /// Its counted part's rate, slowed by the accounting.
    pub per_second: f64,
    pub costs: Vec<LiveCost>,
    /// Every watched program's time per transaction together, in each measurement this one
    /// stands for: their spread.
    pub round_totals: Vec<f64>,
}

impl Account {
    /// Every watched program's time per transaction, together.
    pub fn ns_per_transaction(&self) -> f64 {
        self.costs.iter().map(LiveCost::ns_per_transaction).sum()
    }
}

/// An [`Account`] of the single-host part: ours, in one scenario and metric of the rounds.
#[derive(Clone, Debug)]
pub struct Accounted {
    pub scenario: Scenario,
    pub metric: Metric,
    pub account: Account,
}

/// Runs `measure` with the kernel's run-time accounting on and returns what each of `watched`
/// cost, summed over every loaded program of that name (only the measured path's see traffic
/// meanwhile). A watched program that did not run, or a `bypassed` one that did, fails the
/// bench: the path is not what the report says it is.
pub fn account(
    watched: &[Watched],
    bypassed: &[Watched],
    measure: impl FnOnce() -> Result<Transactions>,
) -> Result<Account> {
    let names: Vec<&str> = watched.iter().chain(bypassed).map(|w| w.program).collect();
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("turning on the kernel's BPF run-time accounting (BPF_ENABLE_STATS)")?;
    let before = totals(&names)?;
    let transactions = measure()?;
    let after = totals(&names)?;
    drop(stats);
    let runs = |i: usize| after[i].0.saturating_sub(before[i].0);
    for (i, program) in bypassed.iter().enumerate() {
        let ran = runs(watched.len() + i);
        if ran != 0 {
            bail!(
                "{} ran {ran} times in live traffic: {}",
                program.program,
                program.what
            );
        }
    }
    let total = transactions.total.max(1) as f64;
    let costs = watched
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let runs = runs(i);
            if runs == 0 {
                bail!("{} did not run in live traffic ({})", w.program, w.what);
            }
            let ns = after[i].1.saturating_sub(before[i].1) as f64;
            Ok(LiveCost {
                program: w.program,
                what: w.what,
                runs,
                ns_per_run: ns / runs as f64,
                runs_per_transaction: runs as f64 / total,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let total = costs.iter().map(LiveCost::ns_per_transaction).sum();
    Ok(Account {
        per_second: transactions.per_second,
        costs,
        round_totals: vec![total],
    })
}

/// The accounts of the rounds (each round's in the same order) merged into one per measured
/// path (see [`merge`]).
pub fn merge_rounds(rounds: &[Vec<Accounted>]) -> Result<Vec<Accounted>> {
    let Some(first) = rounds.first() else {
        return Ok(Vec::new());
    };
    first
        .iter()
        .enumerate()
        .map(|(i, model)| {
            let all = rounds
                .iter()
                .map(|round| {
                    round
                        .get(i)
                        .filter(|a| a.scenario == model.scenario && a.metric == model.metric)
                        .map(|a| &a.account)
                        .context("the rounds accounted different paths")
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Accounted {
                scenario: model.scenario,
                metric: model.metric,
                account: merge(&all)?,
            })
        })
        .collect()
}

/// The accounts of one path over the rounds merged into one: per program the median ns per run
/// and runs per transaction, runs summed; and every round's total kept. One measurement after
/// the rounds would follow the machine's state at that moment alone; its figures moved by half
/// from run to run.
pub fn merge(accounts: &[&Account]) -> Result<Account> {
    let Some(model) = accounts.first() else {
        bail!("no accounts to merge");
    };
    let median = |values: Vec<f64>| Spread::of(&values).map_or(0.0, |s| s.median);
    let same_programs = |a: &&&Account| {
        a.costs.len() == model.costs.len()
            && a.costs
                .iter()
                .zip(&model.costs)
                .all(|(x, y)| x.program == y.program)
    };
    if !accounts.iter().all(|a| same_programs(&a)) {
        bail!("the rounds accounted different programs");
    }
    let costs = model
        .costs
        .iter()
        .enumerate()
        .map(|(j, cost)| {
            let of =
                |f: fn(&LiveCost) -> f64| median(accounts.iter().map(|a| f(&a.costs[j])).collect());
            LiveCost {
                program: cost.program,
                what: cost.what,
                runs: accounts.iter().map(|a| a.costs[j].runs).sum(),
                ns_per_run: of(|c| c.ns_per_run),
                runs_per_transaction: of(|c| c.runs_per_transaction),
            }
        })
        .collect();
    Ok(Account {
        per_second: median(accounts.iter().map(|a| a.per_second).collect()),
        costs,
        round_totals: accounts
            .iter()
            .flat_map(|a| a.round_totals.iter().copied())
            .collect(),
    })
}

/// Runs and run time (ns) of the loaded programs named `names`, each summed over every program
/// of that name.
fn totals(names: &[&str]) -> Result<Vec<(u64, u64)>> {
    let mut totals = vec![(0, 0); names.len()];
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing the loaded BPF programs")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        // The kernel keeps 15 bytes of a name: `tc_from_endpoin`.
        let listed = |program: &str| program.get(..KERNEL_NAME_LEN).unwrap_or(program) == name;
        if let Some(i) = names.iter().position(|p| listed(p)) {
            totals[i].0 += info.run_count();
            totals[i].1 += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        }
    }
    Ok(totals)
}

/// CSV rows in the report's columns for `costs`, under `part`: each program's ns per run, runs
/// per transaction and ns per transaction (one value each: one measurement).
pub fn csv(csv: &mut String, part: &str, costs: &[LiveCost]) {
    for cost in costs {
        for (metric, unit, value) in [
            ("ns_per_run", "ns", cost.ns_per_run),
            ("runs_per_transaction", "runs", cost.runs_per_transaction),
            ("ns_per_transaction", "ns", cost.ns_per_transaction()),
        ] {
            csv_row(
                csv,
                [part, cost.program, cost.what, metric, unit, "value"],
                &[value],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounted(metric: Metric, ns_per_run: [f64; 2], runs: u64) -> Accounted {
        let cost = |program, ns_per_run| LiveCost {
            program,
            what: "",
            runs,
            ns_per_run,
            runs_per_transaction: 1.0,
        };
        let costs = vec![cost("x", ns_per_run[0]), cost("y", ns_per_run[1])];
        Accounted {
            scenario: Scenario::Forward,
            metric,
            account: Account {
                per_second: 1.0,
                round_totals: vec![costs.iter().map(LiveCost::ns_per_transaction).sum()],
                costs,
            },
        }
    }

    #[test]
    fn rounds_merge_into_medians_per_program_with_every_rounds_total_kept() {
        let rounds = [
            vec![accounted(Metric::RrSpin, [100.0, 10.0], 5)],
            vec![accounted(Metric::RrSpin, [300.0, 30.0], 5)],
            vec![accounted(Metric::RrSpin, [200.0, 50.0], 5)],
        ];
        let merged = merge_rounds(&rounds).expect("same paths every round");
        assert_eq!(merged.len(), 1);
        let account = &merged[0].account;
        let per_run: Vec<f64> = account.costs.iter().map(|c| c.ns_per_run).collect();
        assert_eq!(per_run, vec![200.0, 30.0]);
        assert_eq!(account.costs[0].runs, 15);
        assert_eq!(account.round_totals, vec![110.0, 330.0, 250.0]);
        assert!(merge_rounds(&[]).expect("nothing").is_empty());
    }

    #[test]
    fn rounds_that_accounted_other_paths_do_not_merge() {
        let rounds = [
            vec![accounted(Metric::RrSpin, [1.0, 1.0], 1)],
            vec![accounted(Metric::CrrSpin, [1.0, 1.0], 1)],
        ];
        assert!(merge_rounds(&rounds).is_err());
    }

    #[test]
    fn accounts_of_other_programs_do_not_merge() {
        let a = accounted(Metric::RrSpin, [1.0, 1.0], 1).account;
        let mut b = a.clone();
        b.costs[1].program = "z";
        assert!(merge(&[&a, &a]).is_ok());
        assert!(merge(&[&a, &b]).is_err());
        assert!(merge(&[]).is_err());
    }
}
