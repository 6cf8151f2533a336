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
    pub fn toml_value(&self) -> toml::Value {
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
