//! Layered job configurations (`rak::runtime::config`): the repository's `configs/`, layers and
//! their precedence, errors that name the key and the file, the printout, multirun.

use rak::runtime::config::*;
use rak::runtime::data::DataConfig;
use rak::runtime::model::Strategy;
use rak::runtime::train::TrainConfig;
use std::path::Path;

/// The repository's own `configs/`.
fn repo() -> ConfigDir {
    ConfigDir::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs"))
}

fn overrides(texts: &[&str]) -> Vec<Override> {
    texts.iter().map(|t| Override::parse(t).unwrap()).collect()
}

/// A copy of the repository's configs in a fresh folder, with `edits` (file, text) applied.
fn scratch(name: &str, edits: &[(&str, &str)]) -> ConfigDir {
    let root = std::env::temp_dir().join(format!("rak-configs-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    for group in ["", "model", "data", "experiments"] {
        let from = repo().root.join(group);
        std::fs::create_dir_all(root.join(group)).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, root.join(group).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
    for (file, text) in edits {
        std::fs::write(root.join(file), text).unwrap();
    }
    ConfigDir::new(root)
}

#[test]
fn overrides_parse_keys_and_toml_values() {
    let o = Override::parse(" model.d_model = 64 ").unwrap();
    assert_eq!((o.key.as_str(), o.value.as_str()), ("model.d_model", "64"));
    assert_eq!(o.toml_value(), toml::Value::Integer(64));
    let value = |text: &str| Override::parse(&format!("k={text}")).unwrap().toml_value();
    assert_eq!(value("1e-3"), toml::Value::Float(1e-3));
    assert_eq!(value("true"), toml::Value::Boolean(true));
    assert_eq!(value("gla"), toml::Value::String("gla".into()));
    assert_eq!(value("\"a b\""), toml::Value::String("a b".into()));
    assert_eq!(
        value("[32, 16]"),
        toml::Value::Array(vec![toml::Value::Integer(32), toml::Value::Integer(16)])
    );
    for bad in ["steps", "=3", "model..d=1", "a b=1"] {
        let error = Override::parse(bad).unwrap_err();
        assert!(error.contains(bad.trim()), "{error}");
    }
}

#[test]
fn every_shipped_configuration_resolves() {
    let dir = repo();
    let train = dir.resolve("train", &[]).unwrap();
    assert_eq!(train.config.job.mode, Mode::Train);
    assert_eq!(train.config.job.name, "fused");
    assert_eq!(train.config.job.run_dir, "runs/fused");
    assert_eq!(train.config.model.vocab, train.config.data.vocab());
    for experiment in dir.choices(GLOBAL_GROUP) {
        for model in dir.choices("model") {
            for data in dir.choices("data") {
                let set = overrides(&[
                    &format!("experiment={experiment}"),
                    &format!("model={model}"),
                    &format!("data={data}"),
                ]);
                for main in ["train", "test"] {
                    let resolved = dir.resolve(main, &set).unwrap();
                    assert_eq!(resolved.config.job.name, experiment);
                }
            }
        }
    }
    // test.toml extends train.toml: the same model and run directory, another mode.
    let test = dir.resolve("test", &[]).unwrap();
    assert_eq!(test.config.job.mode, Mode::Test);
    assert_eq!(test.config.model, train.config.model);
    assert_eq!(test.config.job.run_dir, train.config.job.run_dir);
    assert_eq!(test.config.test_batches, 16);
    assert_eq!(
        test.layers[..2],
        ["train.toml", "test.toml"].map(|f| { dir.root.join(f).display().to_string() })
    );
}

#[test]
fn later_layers_win_main_then_groups_then_experiment_then_command_line() {
    let dir = scratch(
        "precedence",
        &[
            (
                "experiments/wide.toml",
                "steps = 11\n[model]\nd_model = 96\n",
            ),
            (
                "model/small.toml",
                &std::fs::read_to_string(repo().root.join("model/small.toml"))
                    .unwrap()
                    .replace("d_model = 64", "d_model = 80"),
            ),
        ],
    );
    let resolve = |texts: &[&str]| dir.resolve("train", &overrides(texts)).unwrap().config;
    // The group file beats the main file's defaults; the experiment beats the group.
    assert_eq!(resolve(&[]).model.d_model, 80);
    assert_eq!(resolve(&["experiment=wide"]).model.d_model, 96);
    assert_eq!(resolve(&["experiment=wide"]).steps, 11);
    // The command line beats everything, and a later override beats an earlier one.
    let config = resolve(&["experiment=wide", "model.d_model=40", "steps=5", "steps=6"]);
    assert_eq!((config.model.d_model, config.steps), (40, 6));
    // Where the group choice stands on the command line does not matter.
    assert_eq!(
        resolve(&["model.d_model=40", "experiment=wide"])
            .model
            .d_model,
        40
    );
    // Group selection: another model file, another data file.
    let config = resolve(&["model=seed", "data=dummy"]);
    assert_eq!((config.model.heads, config.model.residual), (1, false));
    assert_eq!(
        config.data,
        DataConfig::Dummy {
            vocab: 32,
            seq_len: 64
        }
    );
    assert_eq!(config.model.vocab, 32);
    std::fs::remove_dir_all(&dir.root).ok();
}

#[test]
fn unknown_keys_wrong_types_and_missing_files_name_the_key_and_the_file() {
    let dir = scratch(
        "errors",
        &[
            ("experiments/typo.toml", "[model]\nd_modle = 96\n"),
            ("experiments/bad.toml", "[optimizer]\nlr = \"fast\"\n"),
        ],
    );
    let error = |texts: &[&str]| dir.resolve("train", &overrides(texts)).unwrap_err();
    let typo = error(&["experiment=typo"]);
    assert!(typo.starts_with("model.d_modle: unknown key"), "{typo}");
    assert!(
        typo.contains("d_model") && typo.contains("experiments/typo.toml"),
        "{typo}"
    );
    let typed = error(&["experiment=bad"]);
    assert!(
        typed.starts_with("optimizer.lr: invalid type: found string \"fast\", expected f64"),
        "{typed}"
    );
    assert!(typed.contains("experiments/bad.toml"), "{typed}");
    let typed = error(&["batch_size=-1"]);
    assert!(typed.starts_with("batch_size: invalid"), "{typed}");
    assert!(
        typed.contains("the command line: `batch_size=-1`"),
        "{typed}"
    );
    let unknown = error(&["optimiser.lr=1"]);
    assert!(unknown.starts_with("optimiser: unknown key"), "{unknown}");
    let choice = error(&["model=huge"]);
    assert!(
        choice.contains("model=huge") && choice.contains("choices: seed, small"),
        "{choice}"
    );
    let main = dir.resolve("trian", &[]).unwrap_err();
    assert!(main.contains("no configuration `trian`"), "{main}");
    // A key no layer sets.
    std::fs::write(
        dir.root.join("train.toml"),
        std::fs::read_to_string(dir.root.join("train.toml"))
            .unwrap()
            .replace("steps = 300\n", ""),
    )
    .unwrap();
    let missing = error(&[]);
    assert!(missing.starts_with("steps: missing"), "{missing}");
    std::fs::remove_dir_all(&dir.root).ok();
}

#[test]
fn the_printout_lists_the_layers_and_reads_back_as_the_same_configuration() {
    let resolved = repo()
        .resolve(
            "train",
            &overrides(&["experiment=unfused", "optimizer.lr=0.01"]),
        )
        .unwrap();
    let text = resolved.to_toml();
    assert!(
        text.contains("#   ") && text.contains("experiments/unfused.toml"),
        "{text}"
    );
    assert!(
        text.contains("the command line: `optimizer.lr=0.01`"),
        "{text}"
    );
    let back: TrainConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, resolved.config);
    assert_eq!(back.optimizer.lr, 0.01);
    assert_eq!(back.model.strategy, Strategy::Unfused);
}

#[test]
fn multirun_runs_every_combination_with_its_own_name() {
    let sets = multirun(&overrides(&[
        "experiment=unfused,fused",
        "model.dims=[8, 8],[4, 4]",
        "steps=3",
    ]));
    assert_eq!(sets.len(), 4);
    let dir = repo();
    let names: Vec<String> = sets
        .iter()
        .map(|set| dir.resolve("train", set).unwrap().config.job.name)
        .collect();
    assert_eq!(
        names,
        [
            "unfused,model.dims=[8, 8]",
            "unfused,model.dims=[4, 4]",
            "fused,model.dims=[8, 8]",
            "fused,model.dims=[4, 4]"
        ]
    );
    let last = dir.resolve("train", &sets[3]).unwrap().config;
    assert_eq!((last.model.dims.clone(), last.steps), (vec![4, 4], 3));
    assert_eq!(multirun(&overrides(&["data.path=\"a,b\""])).len(), 1);
}
