//! Streaming inference with constant memory per token: each prompt is consumed by the forward
//! scan in blocks of a fixed number of tokens (the states carried from block to block), then
//! tokens are produced one step at a time from the carried states with the cell's single-step
//! kernel ([`crate::fused::FusedCellBackend::fused_cell_step`]). Nothing grows with the
//! context: the states are all the model remembers.
//!
//! Sampling: temperature (0 is greedy decoding), top-k, top-p (nucleus), seeded.

use crate::data::{DataConfig, Rng};
use crate::fused::FusedCellBackend;
use crate::model::LanguageModel;
use burn::tensor::{Int, Tensor, TensorData};

/// How the next token is drawn from the model's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits; `0` takes the most likely token (greedy decoding).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the most likely tokens whose probabilities add up to `p` (`None`: all).
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Checks the settings; errors name the option.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature: must be 0 or more, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("--top-k: must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("--top-p: must be in (0, 1], got {p}"));
        }
        Ok(())
    }

    /// Draws a token from `logits` (one row).
    pub fn draw(&self, logits: &[f32], rng: &mut Rng) -> usize {
        if self.temperature == 0.0 {
            // The first of the largest logits.
            let mut best = 0;
            for (i, &value) in logits.iter().enumerate() {
                if value > logits[best] {
                    best = i;
                }
            }
            return best;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let top = logits[order[0]] as f64;
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - top) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        if let Some(p) = self.top_p {
            let mut kept = 0.0;
            let mut keep = weights.len();
            for (n, w) in weights.iter().enumerate() {
                kept += w / total;
                if kept >= p {
                    keep = n + 1;
                    break;
                }
            }
            weights.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut target = rng.unit() * total;
        for (n, w) in weights.iter().enumerate() {
            if target < *w {
                return order[n];
            }
            target -= w;
        }
        *order.last().unwrap_or(&0)
    }
}

/// Turns a prompt into tokens: bytes for text data, else whitespace-separated token numbers.
pub fn encode(data: &DataConfig, prompt: &str) -> Result<Vec<i64>, String> {
    let tokens: Vec<i64> = match data {
        DataConfig::Text { .. } => prompt.bytes().map(i64::from).collect(),
        _ => prompt
            .split_whitespace()
            .map(|word| {
                word.parse::<i64>()
                    .ok()
                    .filter(|&t| t >= 0 && (t as usize) < data.vocab())
                    .ok_or_else(|| {
                        format!(
                            "prompt: `{word}` is not a token of this model's data (numbers 0 to {})",
                            data.vocab() - 1
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    if tokens.is_empty() {
        return Err("prompt: empty (give at least one token)".into());
    }
    Ok(tokens)
}

/// Turns tokens back into text: bytes for text data (lossy UTF-8), else numbers with spaces.
pub fn decode(data: &DataConfig, tokens: &[i64]) -> String {
    match data {
        DataConfig::Text { .. } => {
            let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => tokens.iter().map(|t| format!("{t} ")).collect::<String>(),
    }
}

/// Consumes `prompt` in blocks of `block` tokens (one stream); returns the logits after its
/// last token and each layer's states.
pub fn read_prompt<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    prompt: &[i64],
    block: usize,
    device: &B::Device,
) -> (Vec<f32>, Vec<Tensor<B, 3>>) {
    let mut states: Option<Vec<Tensor<B, 3>>> = None;
    let mut last = Vec::new();
    for part in prompt.chunks(block.max(1)) {
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(part.to_vec(), [1, part.len()]), device);
        let output = model.forward(tokens, states.take());
        let [_, time, vocab] = output.logits.dims();
        last = output
            .logits
            .slice([0..1, time - 1..time, 0..vocab])
            .into_data()
            .to_vec::<f32>()
            .unwrap_or_default();
        states = Some(output.states);
    }
    (last, states.unwrap_or_default())
}

/// Streams ready to generate: each stream's logits for its next token, and each layer's
/// states `[streams, H, Σ state sizes]`.
pub struct Streams<B: FusedCellBackend> {
    pub logits: Vec<Vec<f32>>,
    pub states: Vec<Tensor<B, 3>>,
}

/// Reads each prompt (alone: they differ in length), then puts the streams side by side.
pub fn read_prompts<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    prompts: &[Vec<i64>],
    block: usize,
    device: &B::Device,
) -> Streams<B> {
    let mut logits = Vec::new();
    let mut layer_states: Vec<Vec<Tensor<B, 3>>> = Vec::new();
    for prompt in prompts {
        let (last, states) = read_prompt::<B>(model, prompt, block, device);
        logits.push(last);
        for (layer, state) in states.into_iter().enumerate() {
            if layer_states.len() <= layer {
                layer_states.push(Vec::new());
            }
            layer_states[layer].push(state);
        }
    }
    Streams {
        logits,
        states: layer_states
            .into_iter()
            .map(|per_stream| Tensor::cat(per_stream, 0))
            .collect(),
    }
}

/// Draws `max_tokens` tokens for every stream, one step of the model at a time;
/// `on_token(stream, token)` sees each token as it is drawn. Returns each stream's tokens.
pub fn decode_steps<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    streams: Streams<B>,
    max_tokens: usize,
    sampling: &Sampling,
    device: &B::Device,
    mut on_token: impl FnMut(usize, i64),
) -> Vec<Vec<i64>> {
    let mut rng = Rng::new(sampling.seed);
    let Streams {
        mut logits,
        mut states,
    } = streams;
    let count = logits.len();
    let mut generated = vec![Vec::with_capacity(max_tokens); count];
    for n in 0..max_tokens {
        let tokens: Vec<i64> = logits
            .iter()
            .map(|row| sampling.draw(row, &mut rng) as i64)
            .collect();
        for (stream, &token) in tokens.iter().enumerate() {
            generated[stream].push(token);
            on_token(stream, token);
        }
        if n + 1 == max_tokens {
            break;
        }
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [count, 1]), device);
        let output = model.forward(input, Some(states));
        states = output.states;
        let vocab = output.logits.dims()[2];
        let values = output
            .logits
            .into_data()
            .to_vec::<f32>()
            .unwrap_or_default();
        logits = values.chunks(vocab).map(<[f32]>::to_vec).collect();
    }
    generated
}

/// Generates `max_tokens` tokens after each prompt, all streams at once (prompts read in
/// blocks of `block` tokens); `on_token(stream, token)` sees each token as it is drawn.
/// Returns the generated tokens of each stream.
pub fn generate<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    prompts: &[Vec<i64>],
    max_tokens: usize,
    sampling: &Sampling,
    block: usize,
    device: &B::Device,
    on_token: impl FnMut(usize, i64),
) -> Vec<Vec<i64>> {
    if max_tokens == 0 || prompts.is_empty() {
        return vec![Vec::new(); prompts.len()];
    }
    let streams = read_prompts::<B>(model, prompts, block, device);
    decode_steps::<B>(model, streams, max_tokens, sampling, device, on_token)
}

/// One row of `rak bench generate`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationTiming {
    pub prompt_tokens: usize,
    pub read_seconds: f64,
    pub generated_tokens: usize,
    pub generate_seconds: f64,
    /// Device memory in use after generating, and reserved by the allocator (bytes).
    pub memory: Option<(u64, u64)>,
}

/// Reads a random prompt of each length in `lengths` (in blocks of `block` tokens) then
/// generates `tokens` tokens greedily, one stream; times both (after a warm-up that compiles
/// the kernels of the same shapes) and reads the device memory.
pub fn time_generation<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    vocab: usize,
    lengths: &[usize],
    tokens: usize,
    block: usize,
    device: &B::Device,
) -> Vec<GenerationTiming> {
    let mut rng = Rng::new(7);
    let greedy = Sampling::greedy();
    let block = block.max(1);
    lengths
        .iter()
        .map(|&length| {
            let length = length.max(1);
            // Warm-up: the kernels of this prompt's block shapes (a full block, the last one)
            // and of a step are compiled before timing.
            let warm_up = [vec![0; block + (length % block).max(1)]];
            let streams = read_prompts::<B>(model, &warm_up, block, device);
            decode_steps::<B>(model, streams, 2, &greedy, device, |_, _| {});
            let prompt = vec![(0..length).map(|_| rng.below(vocab) as i64).collect()];
            // Reading logits back to the host waits for the device.
            let started = std::time::Instant::now();
            let streams = read_prompts::<B>(model, &prompt, block, device);
            let read_seconds = started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            decode_steps::<B>(model, streams, tokens, &greedy, device, |_, _| {});
            GenerationTiming {
                prompt_tokens: prompt[0].len(),
                read_seconds,
                generated_tokens: tokens,
                generate_seconds: started.elapsed().as_secs_f64(),
                memory: B::device_memory(device),
            }
        })
        .collect()
}

/// The table of `rak bench generate` (Markdown).
pub fn timing_table(device: &str, rows: &[GenerationTiming]) -> String {
    let mib = |bytes: u64| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
    let mut text = format!(
        "device: {device}\n\n| prompt tokens | read (s) | read tokens/s | generated | generate \
         (s) | generated tokens/s | memory in use (MiB) | memory reserved (MiB) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let (in_use, reserved) = r
            .memory
            .map_or(("–".to_string(), "–".to_string()), |(u, v)| {
                (mib(u), mib(v))
            });
        text += &format!(
            "| {} | {:.3} | {:.0} | {} | {:.3} | {:.1} | {in_use} | {reserved} |\n",
            r.prompt_tokens,
            r.read_seconds,
            r.prompt_tokens as f64 / r.read_seconds.max(1e-9),
            r.generated_tokens,
            r.generate_seconds,
            r.generated_tokens as f64 / r.generate_seconds.max(1e-9),
        );
    }
    text
}
