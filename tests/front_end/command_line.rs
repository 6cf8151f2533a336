//! Parsing the `rak` command line (`rak::runtime::cli`): `rak bench`'s knobs, Hydra's spellings.

use clap::Parser;
use rak::codegen::schedule::Schedule;
use rak::runtime::cli::*;

/// `rak bench`'s backward knobs default to the schedule's, and take `same` or numbers.
#[test]
fn bench_backward_knobs() {
    let parse = |args: &[&str]| {
        let cli = Cli::try_parse_from(["rak", "bench"].iter().chain(args)).unwrap();
        let Command::Bench {
            backward_cube_dim,
            backward_sum_parts,
            ..
        } = cli.command
        else {
            panic!("parsed as another command");
        };
        (backward_cube_dim, backward_sum_parts)
    };
    let defaults = Schedule::default();
    assert_eq!(
        parse(&[]),
        (
            vec![defaults.backward_cube_dim],
            vec![defaults.backward_sum_parts]
        )
    );
    assert_eq!(
        parse(&[
            "--backward-cube-dim",
            "same,128",
            "--backward-sum-parts",
            "8"
        ]),
        (vec![None, Some(128)], vec![Some(8)])
    );
    assert!(Cli::try_parse_from(["rak", "bench", "--backward-sum-parts", "many"]).is_err());
}

/// Knobs given as lists multiply, the first given varying slowest.
#[test]
fn bench_knob_lists_multiply() {
    let schedules = every(vec![Schedule::default()], &[64, 128], |s, v| s.cube_dim = v);
    let schedules = every(schedules, &[None, Some(16), Some(32)], |s, v| s.tile = v);
    let knobs: Vec<(u32, Option<usize>)> = schedules.iter().map(|s| (s.cube_dim, s.tile)).collect();
    assert_eq!(
        knobs,
        [
            (64, None),
            (64, Some(16)),
            (64, Some(32)),
            (128, None),
            (128, Some(16)),
            (128, Some(32))
        ]
    );
    assert!(every(schedules, &[] as &[bool], |s, v| s.registers = v).is_empty());
}

#[test]
fn bench_takes_a_list_of_checkpoint_intervals() {
    let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
        Command::Bench { chunk, .. } => chunk,
        _ => panic!("parsed as another command"),
    };
    assert_eq!(parse(&["rak", "bench", "--chunk", "16,64"]), [16, 64]);
    assert_eq!(parse(&["rak", "bench"]), [Schedule::default().chunk]);
}

#[test]
fn hydra_spellings_select_the_main_file_and_print_the_job() {
    let args = [
        "rak",
        "train",
        "-cn",
        "test",
        "-c",
        "job",
        "-m",
        "experiment=a,b",
    ];
    let cli = Cli::try_parse_from(hydra_spellings(args.map(String::from))).unwrap();
    let Command::Train(job) = cli.command else {
        panic!("parsed as another command");
    };
    assert_eq!(job.config_name.as_deref(), Some("test"));
    assert!(job.print_config && job.multirun);
    assert_eq!(job.overrides, ["experiment=a,b"]);
    // `job` is an override's value elsewhere, and stays.
    let args = ["rak", "train", "-c", "experiment=job"];
    let cli = Cli::try_parse_from(hydra_spellings(args.map(String::from))).unwrap();
    let Command::Train(job) = cli.command else {
        panic!("parsed as another command");
    };
    assert_eq!(job.overrides, ["experiment=job"]);
}
