//! Checkpoints of a run: model and optimizer records with the step and the configuration,
//! written atomically and checked when read.
//!
//! A checkpoint is a folder `checkpoints/step-NNNNNNNN/` of the run directory holding
//! `model.mpk`, `optimizer.mpk` and `state.json` (the step, the model configuration and a hash
//! of each record). It is written into a temporary folder that is then renamed (atomic on one
//! file system), and the file `checkpoints/latest` (also replaced by a rename) names the newest
//! one. Reading checks the hashes (a truncated or altered file is refused) and the model
//! configuration (a checkpoint of another model is refused, naming the first key that differs).
//!
//! [`export_safetensors`] writes a model's weights as safetensors (tensor names are the module
//! paths, `layers.0.projection.weight`; the model configuration travels in the metadata).

use crate::model::ModelConfig;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `state.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    pub model: ModelConfig,
    pub model_hash: String,
    pub optimizer_hash: String,
}

/// A checkpoint read back: its state and the two records' bytes.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
    pub path: PathBuf,
}

/// FNV-1a, 64 bits: enough to tell a damaged file from the one written.
fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn io_error(path: &Path, what: &str) -> impl Fn(std::io::Error) -> String {
    let path = path.display().to_string();
    let what = what.to_string();
    move |e| format!("cannot {what} `{path}`: {e}")
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).map_err(io_error(&temporary, "write"))?;
    std::fs::rename(&temporary, path).map_err(io_error(path, "replace"))
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    write_atomically(path, &bytes)
}

/// Writes a checkpoint of step `step` under `run_dir`, then points `latest` at it.
pub fn save(
    run_dir: &Path,
    step: usize,
    model_config: &ModelConfig,
    model: &[u8],
    optimizer: &[u8],
) -> Result<PathBuf, String> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io_error(&root, "create"))?;
    let name = format!("step-{step:08}");
    let temporary = root.join(format!("{name}.tmp"));
    let target = root.join(&name);
    if temporary.exists() {
        std::fs::remove_dir_all(&temporary).map_err(io_error(&temporary, "remove"))?;
    }
    std::fs::create_dir_all(&temporary).map_err(io_error(&temporary, "create"))?;
    let state = CheckpointState {
        step,
        model: model_config.clone(),
        model_hash: hash(model),
        optimizer_hash: hash(optimizer),
    };
    let files = [
        ("model.mpk", model.to_vec()),
        ("optimizer.mpk", optimizer.to_vec()),
        (
            "state.json",
            serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?,
        ),
    ];
    for (file, bytes) in files {
        let path = temporary.join(file);
        std::fs::write(&path, bytes).map_err(io_error(&path, "write"))?;
    }
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io_error(&target, "remove"))?;
    }
    std::fs::rename(&temporary, &target).map_err(io_error(&target, "rename"))?;
    write_atomically(&root.join("latest"), name.as_bytes())?;
    Ok(target)
}

/// The newest checkpoint of a run directory, or `None` if it has none.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, String> {
    let pointer = run_dir.join("checkpoints").join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io_error(&pointer, "read"))?;
    Ok(Some(run_dir.join("checkpoints").join(name.trim())))
}

/// Reads and checks a checkpoint folder against the model about to receive it.
pub fn load(path: &Path, expected: &ModelConfig) -> Result<Checkpoint, String> {
    let refuse = |why: String| format!("checkpoint `{}` refused: {why}", path.display());
    let read = |file: &str| {
        let file = path.join(file);
        std::fs::read(&file).map_err(|e| refuse(format!("cannot read `{}`: {e}", file.display())))
    };
    let state: CheckpointState = serde_json::from_slice(&read("state.json")?)
        .map_err(|e| refuse(format!("state.json is not a rak checkpoint state: {e}")))?;
    let (model, optimizer) = (read("model.mpk")?, read("optimizer.mpk")?);
    for (file, bytes, expected_hash) in [
        ("model.mpk", &model, &state.model_hash),
        ("optimizer.mpk", &optimizer, &state.optimizer_hash),
    ] {
        if &hash(bytes) != expected_hash {
            return Err(refuse(format!(
                "{file} is damaged (its hash differs from the one recorded when it was written)"
            )));
        }
    }
    if &state.model != expected {
        return Err(refuse(format!(
            "it belongs to another model ({})",
            first_difference(&state.model, expected)
        )));
    }
    Ok(Checkpoint {
        state,
        model,
        optimizer,
        path: path.to_path_buf(),
    })
}

/// `model.d_model = 64 in the checkpoint, 32 in this run`, for the first differing key.
fn first_difference(saved: &ModelConfig, current: &ModelConfig) -> String {
    let (saved, current) = (
        serde_json::to_value(saved).unwrap_or_default(),
        serde_json::to_value(current).unwrap_or_default(),
    );
    if let (Some(saved), Some(current)) = (saved.as_object(), current.as_object()) {
        for (key, value) in saved {
            let other = current.get(key).cloned().unwrap_or_default();
            if &other != value {
                return format!("model.{key} = {value} in the checkpoint, {other} in this run");
            }
        }
    }
    "the model configurations differ".into()
}

/// Writes `model`'s weights to `path` as safetensors, through a temporary file and a rename;
/// the metadata key `rak.model` holds `config` as JSON.
pub fn export_safetensors<B: Backend, M: Module<B>>(
    model: &M,
    config: &ModelConfig,
    path: &Path,
) -> Result<(), String> {
    let temporary = path.with_extension("safetensors.tmp");
    let config = serde_json::to_string(config).map_err(|e| e.to_string())?;
    let mut store = SafetensorsStore::from_file(&temporary)
        .overwrite(true)
        .metadata("rak.model", config);
    model
        .save_into(&mut store)
        .map_err(|e| format!("cannot export `{}`: {e}", path.display()))?;
    std::fs::rename(&temporary, path).map_err(io_error(path, "replace"))
}

/// Loads weights exported by [`export_safetensors`] into `model` (of the same configuration).
pub fn import_safetensors<B: Backend, M: Module<B>>(
    model: &mut M,
    path: &Path,
) -> Result<(), String> {
    let mut store = SafetensorsStore::from_file(path);
    let result = model
        .load_from(&mut store)
        .map_err(|e| format!("cannot import `{}`: {e}", path.display()))?;
    if !result.is_success() {
        return Err(format!("cannot import `{}`: {result}", path.display()));
    }
    Ok(())
}
