//! A generation session: one model, its KV cache and the buffers of a decode step. Prefill
//! runs the prompt in chunks; each decode step is one replay of a captured graph (forward +
//! sampling), so only the sampled token id comes back to the host. With prefix reuse on (a
//! conversation), a prompt that begins with tokens whose keys and values the cache already holds
//! runs only from the first token that differs.

use std::time::{Duration, Instant};

use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::encoder::{CommandEncoder, Graph};
use crate::core::op::{SamplingParams, LONG_ROW_KEYS};
use crate::core::tensor::{PendingRead, Tensor};
use crate::models::decoder::{Decoder, KvCache, Scratch};
use crate::ops;
use crate::{Error, Result};

/// Prompt tokens per forward pass during prefill. Bounds the activation memory (14 f32 rows
/// of hidden to intermediate width per token: 0.6 GB at Llama-3.1-8B's shape); 2048 rows
/// give the tensor-core matmul tiles enough blocks to fill a large GPU.
const PREFILL_CHUNK: usize = 2048;

/// Slots of the ring a decode step leaves its token in. At most two steps are in flight (the
/// pipelined loop in `generate`), so a slot is read before a later step writes it again.
const TOKEN_RING: usize = 4;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these ids (which are reported, not hidden).
    pub stop_ids: Vec<u32>,
    /// Replay a captured decode graph (false: record and submit every step).
    pub use_graph: bool,
}

#[derive(Clone, Debug, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose keys and values the cache already held (prefix reuse): the
    /// prefill ran the rest.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    /// Of `prefill_time`, the host's time recording the forward pass: planning each dispatch
    /// and submitting it as it goes (`CommandEncoder::submit_as_recorded`). A short prompt's
    /// prefill is bound by it where the host plans and enqueues more slowly than the device
    /// runs the kernels.
    pub prefill_record_time: Duration,
    /// Time of the decode steps after the first generated token.
    pub decode_time: Duration,
    /// Kernel dispatches in one decode step.
    pub dispatches_per_token: usize,
    /// Device kernels one decode step launches.
    pub kernels_per_token: usize,
}

/// What a prefill gives back: the first new token, the prompt tokens it reused from the cache,
/// and its time recording the forward pass (`GenerateStats::prefill_record_time`).
struct Prefilled {
    token: u32,
    reused: usize,
    record_time: Duration,
}

impl GenerateStats {
    /// Prompt tokens the prefill ran (not those reused) per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        let ran = self.prompt_tokens.saturating_sub(self.reused_tokens);
        ran as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

pub struct Session {
    model: Decoder,
    device: Device,
    enc: CommandEncoder,
    cache: KvCache,
    /// Position of the token being fed (u32 `[1]`); a decode step advances it on the device.
    pos: Tensor,
    /// What `pos` holds, when known: a decode step writes it only when it jumps.
    pos_on_device: Option<usize>,
    /// The last sampled token (u32 `[1]`), also the decode step's input.
    token: Tensor,
    /// Each decode step's token again, at slot (position % TOKEN_RING) (u32 `[TOKEN_RING]`,
    /// host-mapped): what `generate` reads while the next step runs.
    ring: Tensor,
    /// Every token by position (u32 `[capacity + 1]`), read by the repetition penalty.
    history: Tensor,
    logits: Tensor,
    decode: Scratch,
    /// Captured decode steps for the current sampling, one for each span of row lengths
    /// between LONG_ROW_KEYS (keyed by the `min_keys` they were recorded with).
    decode_graphs: Vec<(SamplingParams, usize, Graph)>,
    prefill: Option<Scratch>,
    /// The tokens whose keys and values the cache holds at positions 0.., as far as known.
    cached: Vec<u32>,
    /// Whether `prefill` starts after the longest prefix of the prompt that `cached` holds.
    reuse_prefix: bool,
}

impl Session {
    /// A session able to hold `capacity` tokens (prompt and generated), its KV caches in the
    /// model's `default_kv_dtype`.
    pub fn new(model: Decoder, device: &Device, capacity: usize) -> Result<Session> {
        let kv_dtype = model.default_kv_dtype();
        Session::with_kv_dtype(model, device, capacity, kv_dtype)
    }

    /// As `new`, with the KV caches in `kv_dtype` (f32 or f16).
    pub fn with_kv_dtype(
        model: Decoder,
        device: &Device,
        capacity: usize,
        kv_dtype: DType,
    ) -> Result<Session> {
        let limit = model.params.max_position_embeddings;
        if capacity == 0 || capacity > limit {
            return Err(Error::Invalid(format!(
                "context of {capacity} tokens: must be between 1 and the model's {limit}"
            )));
        }
        let cache = model.new_cache(device, capacity, kv_dtype)?;
        let decode = model.new_scratch(device, 1)?;
        // Prompts are submitted as they are recorded (`submit_as_recorded`).
        let mut enc = CommandEncoder::new(device);
        enc.submit_as_recorded(true);
        Ok(Session {
            enc,
            pos: device.zeros(&[1], DType::U32)?,
            pos_on_device: Some(0),
            token: device.zeros(&[1], DType::U32)?,
            ring: device.zeros_host_mapped(&[TOKEN_RING], DType::U32)?,
            history: device.zeros(&[capacity + 1], DType::U32)?,
            logits: device.zeros(&[1, model.params.vocab_size], DType::F32)?,
            cache,
            decode,
            decode_graphs: Vec::new(),
            prefill: None,
            cached: Vec::new(),
            reuse_prefix: false,
            device: device.clone(),
            model,
        })
    }

    pub fn model(&self) -> &Decoder {
        &self.model
    }
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }
    pub fn cache_bytes(&self) -> usize {
        self.cache.byte_len()
    }
    pub fn kv_dtype(&self) -> DType {
        self.cache.dtype()
    }
    /// Logits of the last forward pass `[1, vocab]`.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.logits.to_vec::<f32>()
    }

    /// Whether later prefills reuse the cache's keys and values for the longest prefix of their
    /// prompt that it holds (off by default: every prefill runs its whole prompt). A chat turn's
    /// prompt begins with the previous turn's prompt and reply, so only the new tokens run.
    pub fn set_prefix_reuse(&mut self, on: bool) {
        self.reuse_prefix = on;
    }

    /// Leading tokens of `prompt` whose keys and values the cache holds, when prefix reuse is
    /// on: at most all but the last (whose logits the prefill must compute).
    pub fn reusable_prefix(&self, prompt: &[u32]) -> usize {
        if !self.reuse_prefix {
            return 0;
        }
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// Run the prompt through the model (positions 0..len; with prefix reuse, from the first
    /// token the cache does not hold) and sample the first new token.
    pub fn prefill(&mut self, prompt: &[u32], sampling: SamplingParams) -> Result<u32> {
        Ok(self.prefill_reusing(prompt, sampling)?.token)
    }

    /// `prefill`, and how many leading prompt tokens it reused and how long it recorded.
    fn prefill_reusing(&mut self, prompt: &[u32], sampling: SamplingParams) -> Result<Prefilled> {
        if prompt.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        if prompt.len() > self.capacity() {
            return Err(Error::ContextOverflow {
                prompt: prompt.len(),
                max_new: 0,
                context: self.capacity(),
            });
        }
        self.pos_on_device = None;
        let reused = self.reusable_prefix(prompt);
        // Until the passes below are done, the cache holds only the reused prefix for sure.
        self.cached.truncate(reused);
        let mut history = vec![0u32; self.capacity() + 1];
        history[..prompt.len()].copy_from_slice(prompt);
        self.history.write(&history)?;
        let rest = &prompt[reused..];
        let chunk = rest.len().min(PREFILL_CHUNK);
        if self.prefill.as_ref().is_none_or(|s| s.m != chunk) {
            self.prefill = Some(self.model.new_scratch(&self.device, chunk)?);
        }
        let mut record_time = Duration::ZERO;
        for (i, ids) in rest.chunks(chunk).enumerate() {
            let start = reused + i * chunk;
            self.pos.write(&[start as u32])?;
            let tokens = self.device.from_slice(ids, &[ids.len()])?;
            // The last chunk may be shorter: run it on a narrowed scratch of its own.
            let partial;
            let scratch = match &self.prefill {
                Some(s) if s.m == ids.len() => s,
                _ => {
                    partial = self.model.new_scratch(&self.device, ids.len())?;
                    &partial
                }
            };
            self.cache.set_min_keys(start + 1);
            let recording = Instant::now();
            self.model.encode_forward(
                &mut self.enc,
                &tokens,
                &self.pos,
                &self.cache,
                scratch,
                &self.logits,
            )?;
            record_time += recording.elapsed();
            self.enc.commit()?;
        }
        self.cached = prompt.to_vec();
        self.pos.write(&[prompt.len() as u32 - 1])?;
        self.encode_sample(sampling, false)?;
        self.enc.commit()?;
        self.pos_on_device = Some(prompt.len() - 1);
        Ok(Prefilled {
            token: self.token.to_vec::<u32>()?[0],
            reused,
            record_time,
        })
    }

    /// The device's time for one forward pass over `prompt` from position 0 (at most one
    /// prefill chunk), without the host's part: the pass is recorded once as a graph and
    /// replayed `reps` times back to back (`mlxn bench --device-time`). A short prompt's
    /// prefill is bound by recording and enqueuing its launches on a slow host, which this
    /// leaves out. Leaves the cache holding the prompt's keys and values and `logits` its last
    /// row's, as a prefill does, but reuses nothing from the cache afterwards.
    pub fn prefill_device_time(&mut self, prompt: &[u32], reps: usize) -> Result<Duration> {
        if prompt.is_empty() || reps == 0 {
            return Err(Error::Invalid(
                "timing a prefill needs a prompt and a repetition".into(),
            ));
        }
        let most = self.capacity().min(PREFILL_CHUNK);
        if prompt.len() > most {
            return Err(Error::Invalid(format!(
                "timing a prefill of {} tokens: at most {most} (the context, and one prefill \
                 chunk)",
                prompt.len()
            )));
        }
        self.pos_on_device = None;
        self.cached.clear();
        self.pos.write(&[0u32])?;
        let tokens = self.device.from_slice(prompt, &[prompt.len()])?;
        let scratch = self.model.new_scratch(&self.device, prompt.len())?;
        self.cache.set_min_keys(1);
        self.enc.begin_capture()?;
        let recorded = self.model.encode_forward(
            &mut self.enc,
            &tokens,
            &self.pos,
            &self.cache,
            &scratch,
            &self.logits,
        );
        // End the capture whatever the recording did, so that the encoder records again.
        let graph = self.enc.end_capture();
        recorded?;
        let mut graph = graph?;
        // One untimed replay (first launches), then the timed ones.
        graph.replay()?;
        self.device.synchronize()?;
        let start = Instant::now();
        for _ in 0..reps {
            graph.replay()?;
        }
        self.device.synchronize()?;
        Ok(start.elapsed() / reps as u32)
    }

    /// The token choice; at a decode step's end (`end_step`) the token goes into its ring slot
    /// and the position moves on as well, in the argmax's own kernel where the choice is
    /// greedy.
    fn encode_sample(&mut self, sampling: SamplingParams, end_step: bool) -> Result<()> {
        if sampling.temperature <= 0.0 && sampling.repetition_penalty == 1.0 {
            return if end_step {
                ops::argmax_end_step(
                    &mut self.enc,
                    &self.logits,
                    &self.token,
                    &self.pos,
                    &self.ring,
                )
            } else {
                ops::argmax(&mut self.enc, &self.logits, &self.token)
            };
        }
        ops::sample(
            &mut self.enc,
            sampling,
            &self.logits,
            &self.pos,
            &self.token,
            &self.history,
        )?;
        if end_step {
            ops::end_step(&mut self.enc, &self.token, &self.pos, &self.ring)?;
        }
        Ok(())
    }

    /// Feed the last sampled token at position `pos` and sample the next one.
    pub fn decode_step(
        &mut self,
        pos: usize,
        sampling: SamplingParams,
        use_graph: bool,
    ) -> Result<u32> {
        self.submit_step(pos, sampling, use_graph)?;
        self.sampled(self.token.to_vec::<u32>())
    }

    /// Submit the decode step at `pos` (feeding the token on the device, sampling the next into
    /// it) without waiting for it.
    fn submit_step(&mut self, pos: usize, sampling: SamplingParams, use_graph: bool) -> Result<()> {
        if pos >= self.capacity() {
            return Err(Error::ContextOverflow {
                prompt: pos,
                max_new: 1,
                context: self.capacity(),
            });
        }
        if self.pos_on_device != Some(pos) {
            self.pos.write(&[pos as u32])?;
        }
        // The step writes position pos with a token the host may not know (`generate` records
        // the tokens it fed).
        self.cached.truncate(pos);
        // Unknown until the step is submitted (an error may leave it either way).
        self.pos_on_device = None;
        // Rows past each of LONG_ROW_KEYS are recorded with it as their hint (a backend may
        // take other kernels for them): a long conversation replays up to three graphs.
        let min_keys = LONG_ROW_KEYS
            .into_iter()
            .rfind(|&k| pos + 1 >= k)
            .unwrap_or(0);
        self.cache.set_min_keys(min_keys);
        if use_graph {
            self.decode_graphs.retain(|(p, ..)| *p == sampling);
            if !self.decode_graphs.iter().any(|&(_, k, _)| k == min_keys) {
                self.enc.begin_capture()?;
                self.encode_decode(sampling)?;
                let graph = self.enc.end_capture()?;
                self.decode_graphs.push((sampling, min_keys, graph));
            }
            if let Some(graph) = self.decode_graph_mut(min_keys) {
                graph.replay()?;
            }
        } else {
            self.encode_decode(sampling)?;
            self.enc.commit()?;
        }
        self.pos_on_device = Some(pos + 1);
        Ok(())
    }

    /// The read of the token at `position` from its ring slot, once the steps submitted so far
    /// are done.
    fn read_ring(&self, position: usize) -> Result<PendingRead<u32>> {
        self.ring
            .narrow_rows(position % TOKEN_RING, 1)?
            .read_later()
    }

    /// The token a submitted step sampled, from its read (one id); a failed step leaves `pos`
    /// unknown.
    fn sampled(&mut self, read: Result<Vec<u32>>) -> Result<u32> {
        if read.is_err() {
            self.pos_on_device = None;
        }
        read?
            .first()
            .copied()
            .ok_or_else(|| Error::Invalid("a token read of no ids".into()))
    }

    /// Feed `token` (instead of the last sampled one) at position `pos` and sample the next.
    pub fn step_with_token(
        &mut self,
        token: u32,
        pos: usize,
        sampling: SamplingParams,
        use_graph: bool,
    ) -> Result<u32> {
        self.token.write(&[token])?;
        self.decode_step(pos, sampling, use_graph)
    }

    fn encode_decode(&mut self, sampling: SamplingParams) -> Result<()> {
        self.model.encode_forward(
            &mut self.enc,
            &self.token,
            &self.pos,
            &self.cache,
            &self.decode,
            &self.logits,
        )?;
        self.encode_sample(sampling, true)
    }

    fn decode_graph_mut(&mut self, min_keys: usize) -> Option<&mut Graph> {
        self.decode_graphs
            .iter_mut()
            .find(|(_, k, _)| *k == min_keys)
            .map(|(.., g)| g)
    }

    /// The decode step captured last.
    fn last_graph(&self) -> Option<&Graph> {
        self.decode_graphs.last().map(|(.., g)| g)
    }

    /// Dispatches in one decode step (the last captured graph's length).
    pub fn dispatches_per_token(&self) -> usize {
        self.last_graph().map_or(0, Graph::len)
    }

    /// Device kernels one decode step launches (0 before a graph was captured).
    pub fn kernels_per_token(&self) -> usize {
        self.last_graph().map_or(0, Graph::kernel_count)
    }

    /// Prefill `prompt`, then decode until a stop id, `max_new_tokens` or the context end.
    /// `on_token` sees each new id as it is produced and may return false to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerateStats)> {
        if prompt.len() + opts.max_new_tokens > self.capacity() {
            return Err(Error::ContextOverflow {
                prompt: prompt.len(),
                max_new: opts.max_new_tokens,
                context: self.capacity(),
            });
        }
        let mut stats = GenerateStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let mut out = Vec::with_capacity(opts.max_new_tokens);
        if opts.max_new_tokens == 0 {
            return Ok((out, stats));
        }
        let t0 = Instant::now();
        let prefilled = self.prefill_reusing(prompt, opts.sampling)?;
        let mut next = prefilled.token;
        stats.reused_tokens = prefilled.reused;
        stats.prefill_record_time = prefilled.record_time;
        stats.prefill_time = t0.elapsed();
        let t1 = Instant::now();
        // On an asynchronous device the step after the current one is submitted before the
        // current one's token is read: that step reads the token from device memory, so the
        // GPU need not wait for the host between steps. A stop id (or `on_token`) ending the
        // run leaves that one step's work unused.
        let pipelined = self.device.backend().asynchronous();
        let mut ahead: Option<PendingRead<u32>> = None;
        loop {
            out.push(next);
            let go_on = on_token(next);
            if !go_on || opts.stop_ids.contains(&next) || out.len() >= opts.max_new_tokens {
                break;
            }
            let pos = prompt.len() + out.len() - 1;
            let current = match ahead.take() {
                Some(read) => read,
                None => {
                    self.submit_step(pos, opts.sampling, opts.use_graph)?;
                    self.read_ring(pos + 1)?
                }
            };
            if pipelined && out.len() + 1 < opts.max_new_tokens {
                self.submit_step(pos + 1, opts.sampling, opts.use_graph)?;
                ahead = Some(self.read_ring(pos + 2)?);
            }
            next = self.sampled(current.finish())?;
        }
        stats.decode_time = t1.elapsed();
        stats.generated_tokens = out.len();
        // The steps fed every new token but the last at the positions after the prompt (the
        // prefill left `cached` holding the prompt, which the steps past it keep).
        self.cached.extend_from_slice(&out[..out.len() - 1]);
        if opts.use_graph {
            stats.dispatches_per_token = self.dispatches_per_token();
            stats.kernels_per_token = self.kernels_per_token();
        }
        Ok((out, stats))
    }
}
