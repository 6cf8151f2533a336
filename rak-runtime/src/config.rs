//! Layered job configuration, in the manner of the seed's Hydra setup, on figment.
//!
//! A job is resolved from TOML files under a configuration folder (`configs/` by default):
//!
//! 1. the main file, `<name>.toml` (`train` or `test`; the seed's `-cn`), whose `[defaults]`
//!    table picks one file of each group: `model = "small"` reads `model/small.toml`; a main
//!    file may start from another (`extends = "train"`: that file's layers and defaults come
//!    first);
//! 2. the chosen group files, in alphabetical order of group: a group file holds the keys of
//!    its group's table (`model/small.toml` sets `d_model = 64`, which lands at
//!    `model.d_model`), except the global group `experiment` (folder `experiments/`), which is
//!    read last and may set any key, as the seed's experiment files do;
//! 3. the command line's overrides, in order: `key.sub=value` sets a value (parsed as a TOML
//!    value, else taken as a string), `group=choice` picks another group file.
//!
//! Each layer overrides the ones before it. The result must be a complete [`TrainConfig`]:
//! unknown keys and wrong types are errors that name the key and the layer that set it.
//! `job.name` defaults to the chosen experiment (plus, in a multirun, the other swept
//! overrides), and `{name}` in `job.run_dir` is replaced by it; `model.vocab = 0` means the
//! data's vocabulary. [`multirun`] expands
//! comma-separated values (`experiment=unfused,fused`) into one job per combination.

use crate::train::TrainConfig;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The group whose files are applied at the top level rather than under their group's key.
pub const GLOBAL_GROUP: &str = "experiment";

/// What a job does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Train (then validate and test) a model.
    #[default]
    Train,
    /// Evaluate the latest checkpoint of `job.run_dir` on the test split, without training.
    Test,
}

/// The `[job]` table: what to do and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub mode: Mode,
    /// The run's name; empty means the chosen experiment's name (or the main file's).
    #[serde(default)]
    pub name: String,
    /// The run directory; `{name}` is replaced by the run's name.
    pub run_dir: String,
    /// Continue a training run from its latest checkpoint.
    #[serde(default)]
    pub resume: bool,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            mode: Mode::Train,
            name: String::new(),
            run_dir: "runs/{name}".into(),
            resume: false,
        }
    }
}

impl JobConfig {
    /// The run directory with `{name}` filled in.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(self.run_dir.replace("{name}", &self.name))
    }
}

/// One command-line override, `key=value`, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub key: String,
    pub value: String,
    /// One of several values of a multirun: the run's default name mentions it.
    pub swept: bool,
}

impl Override {
    /// Parses `key=value` (`model.d_model=64`, `experiment=fused`).
    pub fn parse(text: &str) -> Result<Override, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("override `{text}`: expected key=value"))?;
        let key = key.trim();
        let valid = !key.is_empty()
            && key.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !valid {
            return Err(format!(
                "override `{text}`: `{key}` is not a key (names joined by dots)"
            ));
        }
        Ok(Override {
            key: key.into(),
            value: value.trim().into(),
            swept: false,
        })
    }

    /// The value as TOML (`64`, `1e-3`, `true`, `[32, 32]`, `"text"`), else as a string.
    fn toml_value(&self) -> toml::Value {
        toml::from_str::<toml::Table>(&format!("value = {}", self.value))
            .ok()
            .and_then(|mut table| table.remove("value"))
            .unwrap_or_else(|| toml::Value::String(self.value.clone()))
    }
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// The jobs of a multirun: every combination of the comma-separated values of `overrides`
/// (commas inside brackets or quotes do not separate), the first override varying slowest.
pub fn multirun(overrides: &[Override]) -> Vec<Vec<Override>> {
    let mut jobs: Vec<Vec<Override>> = vec![Vec::new()];
    for o in overrides {
        let values = split_top_level(&o.value);
        let swept = values.len() > 1;
        jobs = jobs
            .into_iter()
            .flat_map(|job| {
                values.iter().map(move |value| {
                    let mut job = job.clone();
                    job.push(Override {
                        key: o.key.clone(),
                        value: value.clone(),
                        swept,
                    });
                    job
                })
            })
            .collect();
    }
    jobs
}

fn split_top_level(text: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in text.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                parts.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current.trim().to_string());
    parts
}

/// One layer of a resolved configuration: where it comes from and what it sets.
#[derive(Clone, Debug)]
struct Layer {
    /// `configs/model/small.toml`, or ``the command line: `model.d_model=64` ``.
    origin: String,
    file: Option<PathBuf>,
    values: toml::Table,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        match &self.file {
            Some(file) => Metadata::from("TOML file", file.as_path()),
            None => Metadata::named(self.origin.clone()),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = Value::serialize(&self.values)?
            .into_dict()
            .ok_or_else(|| figment::Error::from(format!("{}: not a table", self.origin)))?;
        Ok(Profile::Default.collect(dict))
    }
}

impl Layer {
    /// Whether this layer sets the dotted key `path`.
    fn sets(&self, path: &[String]) -> bool {
        let mut table = &self.values;
        for (i, part) in path.iter().enumerate() {
            match table.get(part) {
                Some(toml::Value::Table(inner)) if i + 1 < path.len() => table = inner,
                Some(_) => return i + 1 == path.len(),
                None => return false,
            }
        }
        true
    }
}

/// A configuration resolved from files and overrides.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub config: TrainConfig,
    /// The group choices that were applied (`model` → `small`).
    pub choices: BTreeMap<String, String>,
    /// Where each layer came from, first to last.
    pub layers: Vec<String>,
}

impl Resolved {
    /// The resolved configuration as TOML, headed by the layers it was made of (what `rak
    /// train -c` prints).
    pub fn to_toml(&self) -> String {
        let mut text = String::from("# resolved from, in order:\n");
        for layer in &self.layers {
            text += &format!("#   {layer}\n");
        }
        text += &toml::to_string_pretty(&self.config)
            .unwrap_or_else(|e| format!("# cannot print as TOML: {e}\n"));
        text
    }
}

/// Reads configurations from a folder (`configs/`).
#[derive(Clone, Debug)]
pub struct ConfigDir {
    pub root: PathBuf,
}

impl ConfigDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ConfigDir { root: root.into() }
    }

    /// The folder of a group: `experiment` lives in `experiments/`, other groups in a folder
    /// of their own name. `None` if the group does not exist.
    fn group_dir(&self, group: &str) -> Option<PathBuf> {
        let folder = if group == GLOBAL_GROUP {
            "experiments".to_string()
        } else {
            group.to_string()
        };
        let dir = self.root.join(folder);
        dir.is_dir().then_some(dir)
    }

    /// The choices a group offers (file names without `.toml`), sorted.
    pub fn choices(&self, group: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .group_dir(group)
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                (path.extension()? == "toml")
                    .then(|| path.file_stem()?.to_str().map(String::from))?
            })
            .collect();
        names.sort();
        names
    }

    /// Resolves main file `name` (`train`, `test`) with `overrides`; see the module
    /// documentation for the order of layers.
    pub fn resolve(&self, name: &str, overrides: &[Override]) -> Result<Resolved, String> {
        let mut choices = BTreeMap::new();
        let mut layers = Vec::new();
        self.main_layers(name, &mut layers, &mut choices)?;
        let main_path = self.root.join(format!("{name}.toml"));
        // Group choices on the command line replace the defaults; other overrides set values.
        let mut values = Vec::new();
        for o in overrides {
            if !o.key.contains('.') && self.group_dir(&o.key).is_some() {
                choices.insert(o.key.clone(), o.value.clone());
            } else {
                values.push(o);
            }
        }
        let order = choices
            .iter()
            .filter(|(group, _)| group.as_str() != GLOBAL_GROUP)
            .chain(
                choices
                    .iter()
                    .filter(|(group, _)| group.as_str() == GLOBAL_GROUP),
            );
        for (group, choice) in order {
            let dir = self.group_dir(group).ok_or_else(|| {
                format!(
                    "{}: defaults.{group}: there is no group `{group}` (no folder `{}`)",
                    main_path.display(),
                    self.root.join(group).display()
                )
            })?;
            let path = dir.join(format!("{choice}.toml"));
            if !path.is_file() {
                return Err(format!(
                    "{group}={choice}: `{}` does not exist (choices: {})",
                    path.display(),
                    self.choices(group).join(", ")
                ));
            }
            let table = read_table(&path)?;
            let values = if group == GLOBAL_GROUP {
                table
            } else {
                toml::Table::from_iter([(group.clone(), toml::Value::Table(table))])
            };
            layers.push(Layer {
                origin: path.display().to_string(),
                file: Some(path),
                values,
            });
        }
        for o in values {
            let mut value = o.toml_value();
            for part in o.key.rsplit('.') {
                value = toml::Value::Table(toml::Table::from_iter([(part.to_string(), value)]));
            }
            let toml::Value::Table(values) = value else {
                unreachable!("a key nests its value in a table")
            };
            layers.push(Layer {
                origin: format!("the command line: `{o}`"),
                file: None,
                values,
            });
        }
        let figment = layers.iter().fold(Figment::new(), |figment, layer| {
            figment.merge(layer.clone())
        });
        let mut config: TrainConfig = figment
            .extract()
            .map_err(|error| describe(error, &layers))?;
        if config.model.vocab == 0 {
            config.model.vocab = config.data.vocab();
        }
        if config.job.name.is_empty() {
            let mut parts = vec![
                choices
                    .get(GLOBAL_GROUP)
                    .cloned()
                    .unwrap_or_else(|| name.to_string()),
            ];
            parts.extend(
                overrides
                    .iter()
                    .filter(|o| o.swept && o.key != GLOBAL_GROUP)
                    .map(Override::to_string),
            );
            config.job.name = parts.join(",");
        }
        config.job.run_dir = config.job.run_dir().display().to_string();
        Ok(Resolved {
            config,
            choices,
            layers: layers.into_iter().map(|layer| layer.origin).collect(),
        })
    }
}

impl ConfigDir {
    /// The layers of main file `name`: those of the file it `extends` (if any), then its own;
    /// its `[defaults]` update `choices`.
    fn main_layers(
        &self,
        name: &str,
        layers: &mut Vec<Layer>,
        choices: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        let path = self.root.join(format!("{name}.toml"));
        if !path.is_file() {
            return Err(format!(
                "no configuration `{name}`: `{}` does not exist",
                path.display()
            ));
        }
        let mut main = read_table(&path)?;
        if let Some(base) = main.remove("extends") {
            let toml::Value::String(base) = base else {
                return Err(format!(
                    "{}: `extends` must name another main file",
                    path.display()
                ));
            };
            if layers.len() > 8 || base == name {
                return Err(format!(
                    "{}: `extends` goes round in a circle",
                    path.display()
                ));
            }
            self.main_layers(&base, layers, choices)?;
        }
        if let Some(defaults) = main.remove("defaults") {
            let toml::Value::Table(defaults) = defaults else {
                return Err(format!(
                    "{}: `defaults` must be a table of group = \"choice\"",
                    path.display()
                ));
            };
            for (group, choice) in defaults {
                let toml::Value::String(choice) = choice else {
                    return Err(format!(
                        "{}: defaults.{group} must be the name of a file in the group's folder",
                        path.display()
                    ));
                };
                choices.insert(group, choice);
            }
        }
        layers.push(Layer {
            origin: path.display().to_string(),
            file: Some(path),
            values: main,
        });
        Ok(())
    }
}

fn read_table(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Each error of a failed extraction as `key: what is wrong (set in LAYER)`, the layer being
/// the last one that sets the key (for an unknown key, the key itself).
fn describe(error: figment::Error, layers: &[Layer]) -> String {
    error
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            let what = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    if path.last() != Some(field) {
                        path.push(field.clone());
                    }
                    format!("unknown key (expected one of: {})", expected.join(", "))
                }
                figment::error::Kind::MissingField(field) => {
                    if path.last().map(String::as_str) != Some(field.as_ref()) {
                        path.push(field.to_string());
                    }
                    "missing: no layer sets it".to_string()
                }
                kind => kind.to_string(),
            };
            let key = if path.is_empty() {
                "(top level)".to_string()
            } else {
                path.join(".")
            };
            let origin = layers
                .iter()
                .rev()
                .find(|layer| layer.sets(&path))
                .map(|layer| format!(" (set in {})", layer.origin))
                .unwrap_or_default();
            format!("{key}: {what}{origin}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's own `configs/`.
    fn repo() -> ConfigDir {
        ConfigDir::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs"))
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
            crate::data::DataConfig::Dummy {
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
        assert_eq!(back.model.strategy, crate::model::Strategy::Unfused);
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
}
