//! Training data. Every batch is a pure function of (seed, split, batch index), so a resumed
//! run sees exactly the batches it would have seen.
//!
//! - `recall` (the embedded default, no download): multi-query associative recall. Each
//!   sequence lists key–value pairs, then asks for every key again; the model must produce its
//!   value. Scored by recall accuracy on the answers: the standard probe of what a recurrent
//!   state remembers (Arora et al. 2023, "Zoology").
//! - `dummy`: uniformly random tokens, as in the seed (nothing to learn; for timing).
//! - `text`: bytes of a file or of every file in a folder (vocabulary 256), split into train,
//!   validation and test parts (90 / 5 / 5 %), read in random windows.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    fn salt(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0000,
            Split::Validation => 0x7661_6c00_0000_0000,
            Split::Test => 0x7465_7374_0000_0000,
        }
    }
}

/// The data section of a run's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataConfig {
    /// Multi-query associative recall: `pairs` key–value pairs per sequence, keys and values
    /// drawn from `vocab / 2` tokens each.
    Recall { vocab: usize, pairs: usize },
    /// Random tokens.
    Dummy { vocab: usize, seq_len: usize },
    /// Bytes of a file or folder.
    Text { path: PathBuf, seq_len: usize },
}

/// One batch: `tokens` are the model's input, `targets` the next tokens, `mask` 1 where the
/// loss and accuracy count; all `[batch, time]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub time: usize,
    pub tokens: Vec<i64>,
    pub targets: Vec<i64>,
    pub mask: Vec<f32>,
}

/// A dataset ready to produce batches.
#[derive(Clone, Debug)]
pub enum Dataset {
    Recall { vocab: usize, pairs: usize },
    Dummy { vocab: usize, seq_len: usize },
    Text { bytes: Vec<u8>, seq_len: usize },
}

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`, with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl DataConfig {
    /// Vocabulary size the model needs.
    pub fn vocab(&self) -> usize {
        match self {
            DataConfig::Recall { vocab, .. } | DataConfig::Dummy { vocab, .. } => *vocab,
            DataConfig::Text { .. } => 256,
        }
    }

    /// Loads the data (reads the text files); errors name the key or the file.
    pub fn load(&self) -> Result<Dataset, String> {
        match self.clone() {
            DataConfig::Recall { vocab, pairs } => {
                if vocab < 4 {
                    return Err(format!(
                        "data.vocab: recall needs at least 4 tokens, got {vocab}"
                    ));
                }
                if pairs == 0 || pairs > vocab / 2 {
                    return Err(format!(
                        "data.pairs: must be between 1 and vocab / 2 = {} (distinct keys), got {pairs}",
                        vocab / 2
                    ));
                }
                Ok(Dataset::Recall { vocab, pairs })
            }
            DataConfig::Dummy { vocab, seq_len } => {
                if vocab == 0 || seq_len == 0 {
                    return Err("data.vocab and data.seq_len: must be at least 1".into());
                }
                Ok(Dataset::Dummy { vocab, seq_len })
            }
            DataConfig::Text { path, seq_len } => {
                let bytes = read_text(&path)?;
                // Each split must hold at least one window.
                if bytes.len() * 5 / 100 < seq_len + 1 {
                    return Err(format!(
                        "data.path: `{}` has {} bytes, too few for windows of {} in a 5 % split",
                        path.display(),
                        bytes.len(),
                        seq_len + 1
                    ));
                }
                Ok(Dataset::Text { bytes, seq_len })
            }
        }
    }
}

fn read_text(path: &Path) -> Result<Vec<u8>, String> {
    let cannot = |e: std::io::Error| format!("data.path: cannot read `{}`: {e}", path.display());
    if path.is_dir() {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut pending = vec![path.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).map_err(cannot)? {
                let entry = entry.map_err(cannot)?.path();
                if entry.is_dir() {
                    pending.push(entry);
                } else {
                    files.push(entry);
                }
            }
        }
        files.sort();
        let mut bytes = Vec::new();
        for file in files {
            bytes.extend(std::fs::read(&file).map_err(cannot)?);
        }
        Ok(bytes)
    } else {
        std::fs::read(path).map_err(cannot)
    }
}

impl Dataset {
    /// Tokens per sequence fed to the model.
    pub fn seq_len(&self) -> usize {
        match self {
            Dataset::Recall { pairs, .. } => 4 * pairs - 1,
            Dataset::Dummy { seq_len, .. } | Dataset::Text { seq_len, .. } => *seq_len,
        }
    }

    /// Accuracy a model that guesses gets (on the masked positions).
    pub fn chance_accuracy(&self) -> f64 {
        match self {
            Dataset::Recall { vocab, .. } => 1.0 / (vocab / 2) as f64,
            Dataset::Dummy { vocab, .. } => 1.0 / *vocab as f64,
            Dataset::Text { .. } => 1.0 / 256.0,
        }
    }

    /// Batch number `index` of `split`.
    pub fn batch(&self, seed: u64, split: Split, index: u64, batch: usize) -> Batch {
        let mut rng = Rng::new(seed ^ split.salt() ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let time = self.seq_len();
        let mut out = Batch {
            batch,
            time,
            tokens: Vec::with_capacity(batch * time),
            targets: Vec::with_capacity(batch * time),
            mask: Vec::with_capacity(batch * time),
        };
        for _ in 0..batch {
            let (sequence, answers) = self.sequence(&mut rng, split);
            out.tokens
                .extend(sequence[..time].iter().map(|&t| t as i64));
            out.targets.extend(sequence[1..].iter().map(|&t| t as i64));
            out.mask
                .extend((0..time).map(|t| if answers(t) { 1.0 } else { 0.0 }));
        }
        out
    }

    /// One sequence of `seq_len + 1` tokens and which input positions are scored.
    fn sequence(&self, rng: &mut Rng, split: Split) -> (Vec<usize>, Box<dyn Fn(usize) -> bool>) {
        match self {
            Dataset::Recall { vocab, pairs } => {
                let (half, pairs) = (vocab / 2, *pairs);
                // Distinct keys (a partial Fisher–Yates shuffle), values anywhere.
                let mut keys: Vec<usize> = (0..half).collect();
                for i in 0..pairs {
                    let j = i + rng.below(half - i);
                    keys.swap(i, j);
                }
                let values: Vec<usize> = (0..pairs).map(|_| half + rng.below(half)).collect();
                let mut sequence = Vec::with_capacity(4 * pairs);
                for i in 0..pairs {
                    sequence.extend([keys[i], values[i]]);
                }
                let mut order: Vec<usize> = (0..pairs).collect();
                for i in (1..pairs).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                for &i in &order {
                    sequence.extend([keys[i], values[i]]);
                }
                // Input position 2·pairs + 2q holds the q-th query: its target is the answer.
                let start = 2 * pairs;
                (
                    sequence,
                    Box::new(move |t| t >= start && (t - start) % 2 == 0),
                )
            }
            Dataset::Dummy { vocab, seq_len } => (
                (0..=*seq_len).map(|_| rng.below(*vocab)).collect(),
                Box::new(|_| true),
            ),
            Dataset::Text { bytes, seq_len } => {
                let (start, end) = split_range(bytes.len(), split);
                let window = seq_len + 1;
                let offset = start + rng.below(end - start - window + 1);
                (
                    bytes[offset..offset + window]
                        .iter()
                        .map(|&b| b as usize)
                        .collect(),
                    Box::new(|_| true),
                )
            }
        }
    }
}

/// The byte range of a split: the first 90 % train, then 5 % validation, 5 % test.
fn split_range(len: usize, split: Split) -> (usize, usize) {
    let (train_end, validation_end) = (len * 90 / 100, len * 95 / 100);
    match split {
        Split::Train => (0, train_end),
        Split::Validation => (train_end, validation_end),
        Split::Test => (validation_end, len),
    }
}
