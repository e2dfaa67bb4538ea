//! Causal attention over the KV cache and the cache append (attention.cu). A few query rows
//! (decode) use split-K flash decoding; more (prefill) use tensor-core flash attention
//! (flash_attention.cu) for head dims it covers, else shared-memory key tiles in f32. The
//! caches are f32 or f16, each with its own build of the source (`kv_t`).

use cudarc::driver::CudaSlice;

use super::norm::{rms_norm_rows, RmsNormRows};
use super::rope::ROPE_NORMED_MAX_HEAD_DIM;
use super::{for_caches, COMMON, KV_F16, KV_F32, MMA, ROPE};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, dim, early_launches, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Launch,
    Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{optional_last, Op, PreNorm, LONG_ROW_KEYS};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) static SOURCE: Source = Source {
    name: "attention",
    parts: &[COMMON, MMA, ROPE, KV_F32, ATTENTION, FLASH_ATTENTION],
};
pub(super) static SOURCE_F16: Source = Source {
    name: "attention_f16",
    parts: &[
        COMMON,
        MMA,
        ROPE,
        KV_F16,
        ATTENTION,
        FLASH_ATTENTION,
        FLASH_DECODE,
    ],
};
const ATTENTION: &str = include_str!("attention.cu");
const FLASH_ATTENTION: &str = include_str!("flash_attention.cu");
const FLASH_DECODE: &str = include_str!("flash_decode.cu");

/// The build for the dtype of the caches.
fn source(caches: [&Tensor; 2]) -> Result<&'static Source> {
    for_caches("attention", &caches, [&SOURCE, &SOURCE_F16])
}

/// Up to this many query rows take the decode kernel (one pass over the keys per row); its
/// new-key buffers in shared memory are sized by the same number (DEC_MAX_ROWS, attention.cu).
const DECODE_MAX_ROWS: usize = 4;
/// PF_WARPS·32 and DEC_WARPS·32 threads (attention.cu).
const THREADS: u32 = 128;
const DECODE_THREADS: u32 = 512;
/// Query rows per prefill block (PF_WARPS·PF_ROWS) and keys per tile (PF_KEYS).
const PREFILL_ROWS: usize = 16;
const PREFILL_KEYS: usize = 32;
/// Query rows per flash block (FA_ROWS), keys per tile (FA_KEYS), threads (FA_WARPS·32), and
/// the head dims with a flash kernel (attn_flash_HD).
const FLASH_ROWS: usize = 64;
const FLASH_KEYS: usize = 64;
/// FA_STAGES: K/V tiles in flight with f16 caches (copied asynchronously).
const FLASH_STAGES: usize = 2;
const FLASH_THREADS: u32 = 128;
const FLASH_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];
/// Head dims are covered in chunks of 32 lanes; kernels exist for up to 8 chunks.
const MAX_HEAD_DIM: usize = 256;
/// Keys a decode split takes, and keys of cache a grid holds a split for (`decode_splitting`:
/// at head dim 64 a split takes half that), and most splits (a bound on the partials' scratch).
const DECODE_MIN_SPLIT_KEYS: usize = 256;
const MAX_SPLITS: usize = 128;
/// The tensor-core decode kernel's head dims, largest group (FD_MAX_GROUP in flash_decode.cu),
/// threads (FD_WARPS·32) and keys a split (its planner's rule, passed to the kernel).
const FLASH_DECODE_HEAD_DIMS: [usize; 2] = [64, 128];
const FLASH_DECODE_MAX_GROUP: usize = 8;
const FLASH_DECODE_THREADS: u32 = 256;
const FLASH_DECODE_MIN_SPLIT_KEYS: usize = 128;
/// From this many head dims a lane (HC: head dims over 64), a head whose keys would take three
/// passes or more takes one split a pass (DEC_PASS_SPLIT_MIN_HC, attention.cu's
/// `active_splits`).
const DECODE_PASS_SPLIT_MIN_HC: usize = 3;

/// Keys a decode pass takes at `hc` dims a lane: attention.cu's DEC_WARPS·`dec_keys(hc)`.
fn decode_pass_keys(hc: usize) -> usize {
    DECODE_THREADS as usize / 32
        * match hc {
            1 => 32,
            2 => 16,
            3 | 4 => 8,
            _ => 4,
        }
}

pub(super) fn register(reg: &mut Registry<Planner>) {
    reg.insert("attention", "", DType::F32, attention);
    reg.insert("rope_attention", "", DType::F32, rope_attention);
    // Keyed by the output's dtype, which for kv_append is the cache's.
    reg.insert("kv_append", "", DType::F32, kv_append);
    reg.insert("kv_append", "", DType::F16, kv_append);
}

/// An `Op::Attention`'s constants as the kernels take them (0 for no window or softcap).
struct Shape {
    n_heads: usize,
    group: usize,
    head_dim: usize,
    scale: f32,
    window: usize,
    softcap: f32,
    /// Keys every row sees at least (`AttentionShape::min_keys` within the window).
    min_keys: usize,
}

impl Shape {
    fn new(op: &Op) -> Result<Shape> {
        let Op::Attention(a) = op else {
            return Err(wrong_op(op));
        };
        a.check("attention")?;
        if a.head_dim > MAX_HEAD_DIM {
            return Err(Error::op(
                "attention",
                format!("head dim {} outside 1..={MAX_HEAD_DIM}", a.head_dim),
            ));
        }
        Ok(Shape {
            n_heads: a.n_heads,
            group: a.n_heads / a.n_kv_heads,
            head_dim: a.head_dim,
            scale: a.scale,
            window: a.window.unwrap_or(0),
            softcap: a.softcap.unwrap_or(0.0),
            min_keys: a.window.map_or(a.min_keys, |w| w.min(a.min_keys)),
        })
    }
}

/// The new rows' k (by address) and v and the RoPE that the decode kernel applies to them and
/// to q (`rope_attention`).
struct NewKeys<'a> {
    k: u64,
    v: &'a Tensor,
    inv_freq: &'a Tensor,
    rotary_dims: usize,
    traditional: bool,
    mscale: f32,
    /// Head norms the kernel applies to q and k before the rotation (one query row only).
    head_norm: Option<HeadNorm<'a>>,
}

/// A `RopeAttention`'s head norms: the q and k norm weights and the parameters.
type HeadNorm<'a> = (&'a Tensor, &'a Tensor, PreNorm);

fn attention(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([q, k_cache, v_cache, pos], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let shape = Shape::new(op)?;
    if q.rows() > DECODE_MAX_ROWS {
        let launch = prefill(
            lib,
            &shape,
            (device_ptr(q)?, q.rows()),
            k_cache,
            v_cache,
            pos,
            out,
        )?;
        return Ok(CudaKernel::single(launch));
    }
    let operands = DecodeOperands {
        q: device_ptr(q)?,
        rows: q.rows(),
        new_keys: None,
        caches: (k_cache, v_cache),
        pos,
        out: (out, 0),
    };
    let (launch, partials) = decode(lib, &shape, operands)?;
    Ok(CudaKernel::new(vec![launch], partials))
}

/// Decode: one kernel rotates q and the new keys (head-norming them first for one row),
/// appends them and attends. Prefill: the rope_kv_append kernel writes the rotated q into
/// shared scratch, then attention as above. Head norms of several rows run first, as rms_norm
/// launches into shared scratch.
fn rope_attention(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let (
        Some((rope, attend)),
        &Op::RopeAttention {
            head_norm,
            half_out,
            ..
        },
    ) = (op.rope_attention_steps(), op)
    else {
        return Err(wrong_op(op));
    };
    let (outputs, out_h) = optional_last(half_out, outputs);
    let Op::RopeKvAppend {
        rotary_dims,
        traditional,
        mscale,
        ..
    } = rope
    else {
        return Err(wrong_op(op));
    };
    let ([q, k, v, inv_freq, pos, norm_weights @ ..], [out, k_cache, v_cache]) = (inputs, outputs)
    else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let head_norm = match (head_norm, norm_weights) {
        (None, []) => None,
        (Some(norm), [q_w, k_w]) => Some((q_w, k_w, norm)),
        _ => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    let shape = Shape::new(&attend)?;
    let rows = q.rows();
    // q/k head norms: inside decode attention for one row, inside the rope pass for prompts
    // past EARLY_LAUNCH_ROWS, else normed into scratch first. H200, 2026-11-29, Qwen3-0.6B
    // shape, prefill's device time, the rope pass against the two norm launches: 128 tokens
    // +3.5%; 8 / 16 tokens −0.4 / −1.2%, where the norms launch early and the rope pass (a
    // block a row) runs on few SMs.
    let (folded, in_rope, staged) = match head_norm {
        Some(norm) if rows == 1 => (Some(norm), None, None),
        Some(norm) if !early_launches(rows) && shape.head_dim <= ROPE_NORMED_MAX_HEAD_DIM => {
            (None, Some(norm), None)
        }
        other => (None, None, other),
    };
    // Shared scratch (one request, so that nothing overlaps): the normed q and k when staged,
    // then prefill's rotated q, each at a 16-byte boundary (flash attention's q needs it).
    let q_span = q.byte_len().next_multiple_of(16);
    let normed_span = staged.map_or(0, |_| q_span + k.byte_len().next_multiple_of(16));
    let prefilling = rows > DECODE_MAX_ROWS;
    // The decode kernel writes the output's f16 copy (one row, checked by the op).
    let out_h = match out_h {
        Some(t) if !prefilling => super::matmul::half_copy_ptr(op, t, out.elem_count())?,
        Some(_) => return Err(Error::op(op.name(), "an f16 copy of many rows")),
        None => 0,
    };
    let scratch_bytes = normed_span + if prefilling { q_span } else { 0 };
    let (scratch, base) = match scratch_bytes {
        0 => (None, 0),
        bytes => {
            let (slice, address) = lib.shared_scratch(bytes)?;
            (Some(slice), address)
        }
    };
    let mut launches = Vec::new();
    let (q_at, k_at) = match staged {
        Some((q_w, k_w, norm)) => {
            let (q_normed, k_normed) = (base, base + q_span as u64);
            launches.push(head_norm_launch(lib, q, q_w, norm, q_normed)?);
            launches.push(head_norm_launch(lib, k, k_w, norm, k_normed)?);
            (q_normed, k_normed)
        }
        None => (device_ptr(q)?, device_ptr(k)?),
    };
    let mut partials = None;
    if prefilling {
        let q_rot = base + normed_span as u64;
        launches.push(super::rope::rope_kv_append_launch(
            lib,
            &rope,
            (q_at, k_at),
            [v, inv_freq, pos],
            q_rot,
            (k_cache, v_cache),
            in_rope,
        )?);
        launches.push(prefill(
            lib,
            &shape,
            (q_rot, rows),
            k_cache,
            v_cache,
            pos,
            out,
        )?);
    } else {
        let new_keys = NewKeys {
            k: k_at,
            v,
            inv_freq,
            rotary_dims,
            traditional,
            mscale,
            head_norm: folded,
        };
        let operands = DecodeOperands {
            q: q_at,
            rows,
            new_keys: Some(new_keys),
            caches: (k_cache, v_cache),
            pos,
            out: (out, out_h),
        };
        let (launch, p) = decode(lib, &shape, operands)?;
        launches.push(launch);
        partials = p;
    }
    let kernel = CudaKernel::new(launches, partials);
    Ok(match scratch {
        Some(s) => kernel.holding(s),
        None => kernel,
    })
}

/// The RMSNorm of each head of `x` (rows of the weight's length) into address `out`.
fn head_norm_launch(
    lib: &KernelLibrary,
    x: &Tensor,
    w: &Tensor,
    norm: PreNorm,
    out: u64,
) -> Result<Launch> {
    let d = w.elem_count();
    let rows = RmsNormRows {
        x: device_ptr(x)?,
        residual: 0,
        out,
        rows: x.elem_count() / d.max(1),
        d,
        tokens: x.rows(),
    };
    rms_norm_rows(lib, rows, w, norm)
}

/// Many query rows (`q`: address and row count): tensor-core flash attention where the head
/// dim has a kernel and the operands are 16-byte aligned, else key tiles in f32.
fn prefill(
    lib: &KernelLibrary,
    shape: &Shape,
    (q, rows): (u64, usize),
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: &Tensor,
    out: &Tensor,
) -> Result<Launch> {
    let source = source([k_cache, v_cache])?;
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    let flash_ready = FLASH_HEAD_DIMS.contains(&shape.head_dim)
        && [
            q,
            device_ptr(k_cache)?,
            device_ptr(v_cache)?,
            device_ptr(out)?,
        ]
        .iter()
        .all(|p| p % 16 == 0);
    let args = Args::new()
        .u64(q)
        .ptr(k_cache)?
        .ptr(v_cache)?
        .ptr(pos)?
        .ptr(out)?
        .int(shape.n_heads)?
        .int(shape.group)?;
    if flash_ready {
        // f16 tiles of q and of K and V, each row padded by 8 halves; f16 caches' K and V
        // tiles in FLASH_STAGES buffers.
        let stages = match k_cache.dtype() {
            DType::F16 => FLASH_STAGES,
            _ => 1,
        };
        let shared = (FLASH_ROWS + 2 * stages * FLASH_KEYS) * (shape.head_dim + 8) * 2;
        let args = args
            .int(capacity)?
            .f32(shape.scale)
            .int(shape.window)?
            .f32(shape.softcap)
            .int(rows)?
            .early_launch(rows);
        let grid = (dim(shape.n_heads)?, blocks(rows, FLASH_ROWS)?, 1);
        let name = format!("attn_flash_{}", shape.head_dim);
        return lib.launch(source, &name, grid, FLASH_THREADS, shared as u32, args);
    }
    let shared = ((PREFILL_ROWS + 2 * PREFILL_KEYS) * shape.head_dim + PREFILL_KEYS) * 4;
    let args = args
        .int(shape.head_dim)?
        .int(capacity)?
        .f32(shape.scale)
        .int(shape.window)?
        .f32(shape.softcap)
        .int(rows)?
        .early_launch(rows);
    let grid = (dim(shape.n_heads)?, blocks(rows, PREFILL_ROWS)?, 1);
    let name = format!("attn_prefill_{}", shape.head_dim.div_ceil(32));
    lib.launch(source, &name, grid, THREADS, shared as u32, args)
}

/// The alignment decode attention's K/V loads need of a cache of `elem_bytes` elements: where
/// whole rows hold 32·HC dims, a lane loads its dims as vectors of `dims_run<HC>()` elements
/// (attention.cu's `load_dims`); other rows are read an element at a time. Rows are whole
/// multiples of that, so the cache's start decides.
/// `decode_attention_takes_caches_at_the_alignment_it_checks` (tests/cuda_backend.rs) runs the
/// kernel on caches at every element offset the rule accepts.
fn decode_cache_alignment(head_dim: usize, elem_bytes: usize) -> u64 {
    let hc = head_dim.div_ceil(32);
    let run = if head_dim != 32 * hc {
        1
    } else if hc.is_multiple_of(4) {
        4
    } else if hc.is_multiple_of(2) {
        2
    } else {
        1
    };
    (elem_bytes * run) as u64
}

/// What a decode kernel (`attn_decode`, `attn_flash_decode`) reads and writes: q (address)
/// and its row count, the new rows' k and v with their rotation (`rope_attention`; none: the
/// caches hold every key), the caches, pos, and the output with the address of its f16 copy
/// (0: none).
struct DecodeOperands<'a> {
    q: u64,
    rows: usize,
    new_keys: Option<NewKeys<'a>>,
    caches: (&'a Tensor, &'a Tensor),
    pos: &'a Tensor,
    out: (&'a Tensor, u64),
}

impl DecodeOperands<'_> {
    /// Positions the caches hold.
    fn capacity(&self) -> usize {
        self.caches.0.shape().get(1).copied().unwrap_or(0)
    }
}

/// A few query rows: split-K flash decoding (`attn_decode`), or for one long row over f16
/// caches the tensor-core kernel (`flash_decode`). The launch, and the scratch of its split
/// partials if it has several splits.
fn decode(
    lib: &KernelLibrary,
    shape: &Shape,
    operands: DecodeOperands,
) -> Result<(Launch, Option<CudaSlice<u8>>)> {
    let (k_cache, v_cache) = operands.caches;
    let source = source([k_cache, v_cache])?;
    let (rows, capacity) = (operands.rows, operands.capacity());
    let align = decode_cache_alignment(shape.head_dim, k_cache.dtype().size_in_bytes());
    for cache in [k_cache, v_cache] {
        let address = device_ptr(cache)?;
        if !address.is_multiple_of(align) {
            return Err(Error::Invalid(format!(
                "decode attention: a KV cache at {address:#x}, not {align}-byte aligned (head \
                 dim {})",
                shape.head_dim
            )));
        }
    }
    if flash_decodes(shape, rows, k_cache.dtype())
        && device_ptr(k_cache)?.is_multiple_of(16)
        && device_ptr(v_cache)?.is_multiple_of(16)
    {
        return flash_decode(lib, shape, operands);
    }
    // One wave of blocks (one fits per multiprocessor) over all heads and rows, no more splits
    // than the cache can fill; at run time a row uses as many as its keys fill
    // (`active_splits`, attention.cu). H100, 2026-11-26: ceil(keys / 512) splits instead lost
    // 3% on the 1B shape after 1,024 tokens (3 splits, 96 blocks on 132 SMs).
    let hc = shape.head_dim.div_ceil(32);
    let blocks = shape.n_heads * rows;
    let splitting = decode_splitting(blocks, lib.sm_count(), hc, k_cache.dtype());
    let splits = splitting.grid(lib.sm_count(), blocks, capacity);
    // Partials, then a merge counter per (row, head).
    let partial_bytes = rows * shape.n_heads * splits * (shape.head_dim + 2) * 4;
    let name = format!("attn_decode_{hc}");
    let grid = (dim(shape.n_heads)?, dim(splits)?, dim(rows)?);
    let scratch = (partial_bytes, rows * shape.n_heads);
    launch_decode(
        lib,
        (source, &name),
        (grid, DECODE_THREADS),
        shape,
        operands,
        (scratch, splitting),
    )
}

/// A grid of more heads (times rows) than one for every CROWDED_SMS multiprocessors is crowded
/// (`decode_splitting`).
const CROWDED_SMS: usize = 8;

/// How a decode kernel splits rows over blocks: the grid holds a split (up to a wave of
/// blocks) for every `grid_keys` of cache, and at run time a row of `min_keys` keys or more
/// takes one for every `keys` (a power of two: attn_decode shifts by it).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Splitting {
    grid_keys: usize,
    min_keys: usize,
    keys: usize,
}

impl Splitting {
    /// Splits of the grid: one wave of `blocks`-block groups, no more than the cache fills.
    fn grid(&self, sm_count: usize, blocks: usize, capacity: usize) -> usize {
        (sm_count / blocks.max(1))
            .min(capacity / self.grid_keys)
            .clamp(1, MAX_SPLITS)
    }
}

/// How attn_decode splits a row (`active_splits` in attention.cu; at head dims over 64 it also
/// splits by passes, and its grid holds a split for every pass of cache; the shift, not a
/// division, keeps the kernel's first loads early). A split costs a merge (a counter, then the
/// last block's pass over the partials) and, where the grid's heads already hold many
/// multiprocessors, the ones the next kernel's blocks (the o projection's) would have launched
/// on early to request their weights; it spreads a row's K/V over more multiprocessors. At head
/// dim 64 (passes of 256 keys) splits take 128 keys or more, from 512 keys, but a crowded grid
/// splits a row only from four passes over f32 caches, from five over f16 (whose passes cost
/// less); elsewhere splits take 256 keys, from 512. H100, decode of 64 or 128 tokens after N.
/// 2026-11-28, split from 512 keys before → after, the Llama-3.2-1B shape (32 heads) with f32
/// caches after 512 and 640 tokens +5.0% / +4.6%, after 768 and 896 unsplit −1.3% / −0.7%; with
/// f16 caches +7.6% / +8.9% after 512 / 640, unsplit +5.0% / +4.4% after 768 / 896; SmolLM2 (9
/// heads) unsplit: +1.9% after 512 but −2.1% after 640 and −11% after 768. Then splits of 128
/// keys instead of 256 at head dim 64, in grids as before: SmolLM2 +7.1% / +5.2% after 512 /
/// 1,024 tokens (±0 after 16, 128 and 2,048), the 1B +2.8% after 768. (Grids of a split for
/// every 128 keys as well, up to 14 a head for SmolLM2, cost it 0.7% after 16 tokens: blocks
/// that exit at once still take SMs from the next kernel.) At head dims 128 and 256 splitting
/// by passes from five passes read the same, by 256-key splits from 512 keys or from 1,025
/// slower (2026-11-28: the 8B up to −2.9%, Qwen3-0.6B up to −8.9%, Gemma-3-1B −9% to −19%).
fn decode_splitting(blocks: usize, sm_count: usize, hc: usize, cache: DType) -> Splitting {
    let grid_keys = if hc >= DECODE_PASS_SPLIT_MIN_HC {
        decode_pass_keys(hc)
    } else {
        DECODE_MIN_SPLIT_KEYS
    };
    let keys = if hc == 2 {
        DECODE_MIN_SPLIT_KEYS / 2
    } else {
        DECODE_MIN_SPLIT_KEYS
    };
    let crowded = hc == 2 && blocks * CROWDED_SMS > sm_count;
    let min_keys = match (crowded, cache) {
        (false, _) => 2 * DECODE_MIN_SPLIT_KEYS,
        (true, DType::F16) => 4 * decode_pass_keys(hc) + 1,
        (true, _) => 3 * decode_pass_keys(hc) + 1,
    };
    Splitting {
        grid_keys,
        min_keys,
        keys,
    }
}

/// Whether one decode row takes the tensor-core kernel (flash_decode.cu): f16 caches, head dim
/// 64 or 128, a GQA group of 2 to 8 heads, rows of `flash_decode_min_keys` or more by the op's
/// hint (and caches 16-byte aligned, checked by `decode`). Shorter rows are latency, where a
/// block a head (`attn_decode`) spreads the work over more multiprocessors.
fn flash_decodes(shape: &Shape, rows: usize, cache: DType) -> bool {
    rows == 1
        && cache == DType::F16
        && FLASH_DECODE_HEAD_DIMS.contains(&shape.head_dim)
        && (2..=FLASH_DECODE_MAX_GROUP).contains(&shape.group)
        && shape.min_keys >= flash_decode_min_keys(shape.head_dim)
}

/// The shortest rows the tensor-core decode kernel takes at head dim `hd` (one of
/// LONG_ROW_KEYS, where the session records a step apart). H100, 2026-11-27, decode against
/// the SIMT kernel in one call: at head dim 64 (the 1B shape with f16 caches) +5.1% after
/// 1,024 tokens and +9.3% after 2,048; at 128 the 8B −1.7% after 1,024 and +4.1% after 4,096,
/// Qwen3-0.6B +0.2% and +0.6% after 1,024 and 2,048.
fn flash_decode_min_keys(hd: usize) -> usize {
    if hd <= 64 {
        LONG_ROW_KEYS[0]
    } else {
        LONG_ROW_KEYS[1]
    }
}

/// Launches decode kernel `name` of `source` on `grid` of `threads`, with the scratch of its
/// split partials, `partial_bytes`, and `counters` merge counters (zeroed here, reset by the
/// merging block) when the grid has several splits, and how a row splits (`splitting`, which
/// both kernels apply through attention.cu's `splits_by_keys`).
fn launch_decode(
    lib: &KernelLibrary,
    (source, name): (&'static Source, &str),
    (grid, threads): ((u32, u32, u32), u32),
    shape: &Shape,
    operands: DecodeOperands,
    ((partial_bytes, counters), splitting): ((usize, usize), Splitting),
) -> Result<(Launch, Option<CudaSlice<u8>>)> {
    let (scratch, partial, counters) = match grid.1 {
        1 => (None, 0, 0),
        _ => {
            let (slice, address) = lib.zeroed_scratch(partial_bytes + counters * 4)?;
            (Some(slice), address, address + partial_bytes as u64)
        }
    };
    let capacity = operands.capacity();
    let DecodeOperands {
        q,
        new_keys,
        caches: (k_cache, v_cache),
        pos,
        out: (out, out_h),
        ..
    } = operands;
    let args = Args::new().u64(q);
    let args = match &new_keys {
        Some(nk) => args
            .u64(nk.k)
            .ptr(nk.v)?
            .ptr(nk.inv_freq)?
            .int(nk.rotary_dims)?
            .code(nk.traditional as i32)
            .f32(nk.mscale),
        None => args.u64(0).u64(0).u64(0).code(0).code(0).f32(1.0),
    };
    let args = match new_keys.and_then(|nk| nk.head_norm) {
        Some((q_w, k_w, norm)) => args.ptr(q_w)?.ptr(k_w)?.f32(norm.eps).f32(norm.w_offset()),
        None => args.u64(0).u64(0).f32(0.0).f32(0.0),
    };
    let args = args
        .ptr(k_cache)?
        .ptr(v_cache)?
        .ptr(pos)?
        .ptr(out)?
        .u64(out_h)
        .u64(partial)
        .u64(counters)
        .int(shape.n_heads)?
        .int(shape.group)?
        .int(shape.head_dim)?
        .int(capacity)?
        .f32(shape.scale)
        .int(shape.window)?
        .f32(shape.softcap)
        .int(splitting.min_keys)?
        .code(splitting.keys.trailing_zeros() as i32);
    let launch = lib.launch(source, name, grid, threads, 0, args)?;
    Ok((launch, scratch))
}

/// One decode row on tensor cores (`attn_flash_decode_HD`): a block a kv head and split, its
/// heads together; splits of FLASH_DECODE_MIN_SPLIT_KEYS or more, one wave of blocks at most.
fn flash_decode(
    lib: &KernelLibrary,
    shape: &Shape,
    operands: DecodeOperands,
) -> Result<(Launch, Option<CudaSlice<u8>>)> {
    let n_kv = shape.n_heads / shape.group;
    // Every row splits, into one split for each FLASH_DECODE_MIN_SPLIT_KEYS.
    let splitting = Splitting {
        grid_keys: FLASH_DECODE_MIN_SPLIT_KEYS,
        min_keys: 0,
        keys: FLASH_DECODE_MIN_SPLIT_KEYS,
    };
    let splits = splitting.grid(lib.sm_count(), n_kv, operands.capacity());
    let name = format!("attn_flash_decode_{}", shape.head_dim);
    let grid = (dim(n_kv)?, dim(splits)?, 1);
    let scratch = (shape.n_heads * splits * (shape.head_dim + 2) * 4, n_kv);
    let threads = FLASH_DECODE_THREADS;
    launch_decode(
        lib,
        (&SOURCE_F16, &name),
        (grid, threads),
        shape,
        operands,
        (scratch, splitting),
    )
}

fn kv_append(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::KvAppend {
        n_kv_heads,
        head_dim,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let ([x, pos], [cache]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let source = for_caches("kv_append", &[cache], [&SOURCE, &SOURCE_F16])?;
    let rows = x.rows();
    let capacity = cache.shape().get(1).copied().unwrap_or(0);
    let args = Args::new()
        .ptr(x)?
        .ptr(pos)?
        .ptr(cache)?
        .int(rows)?
        .int(n_kv_heads)?
        .int(head_dim)?
        .int(capacity)?;
    let grid = (blocks(x.elem_count(), 256)?, 1, 1);
    Ok(CudaKernel::single(lib.launch(
        source,
        "kv_append",
        grid,
        256,
        0,
        args,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vector K/V loads only where rows are whole chunks of 32 dims: runs of 4 elements (hd
    /// 128, 256), of 2 (hd 64), one element otherwise (hd 32, 96, odd ones); f32 or f16.
    #[test]
    fn decode_caches_aligned_as_their_loads() {
        for (head_dim, run) in [
            (64, 2),
            (128, 4),
            (256, 4),
            (32, 1),
            (96, 1),
            (80, 1),
            (40, 1),
        ] {
            for elem_bytes in [4, 2] {
                assert_eq!(
                    decode_cache_alignment(head_dim, elem_bytes),
                    (run * elem_bytes) as u64,
                    "head dim {head_dim}, {elem_bytes}-byte elements"
                );
            }
        }
    }

    /// Rows of a decode grid of many heads at head dim 64 split from four passes (f32 caches)
    /// or five (f16); grids of few heads, and other head dims, from 512 keys. Splits take 128
    /// keys at head dim 64, 256 elsewhere; grids hold a split for every 256 keys of cache (a
    /// pass of 128 at head dim 128).
    #[test]
    fn crowded_decode_grids_split_later() {
        let sms = 132;
        for (blocks, hc, cache, (grid_keys, min_keys, keys)) in [
            (32, 2, DType::F32, (256, 769, 128)),  // Llama-3.2-1B
            (32, 2, DType::F16, (256, 1025, 128)), // its f16 caches
            (16, 2, DType::F32, (256, 512, 128)),  // 16 · 8 ≤ 132: not crowded
            (17, 2, DType::F32, (256, 769, 128)),
            (9, 2, DType::F32, (256, 512, 128)), // SmolLM2
            (32, 4, DType::F16, (128, 512, 256)),
            (32, 1, DType::F32, (256, 512, 256)),
        ] {
            let want = Splitting {
                grid_keys,
                min_keys,
                keys,
            };
            assert_eq!(
                decode_splitting(blocks, sms, hc, cache),
                want,
                "{blocks} blocks, {hc} dims a lane, {cache} caches"
            );
        }
        // The 1B's grid: 4 splits a head on 132 SMs once the cache holds 1,024 keys.
        let one_b = decode_splitting(32, sms, 2, DType::F32);
        assert_eq!(
            (one_b.grid(sms, 32, 4096), one_b.grid(sms, 32, 600)),
            (4, 2)
        );
    }

    /// The attention kernels' shared-memory buffers and split rules are sized by constants of
    /// their sources that the planner repeats: a mismatch would index past the buffers.
    #[test]
    fn planner_constants_match_the_kernel() {
        super::super::assert_defines(
            "attention.cu",
            ATTENTION,
            &[
                ("DEC_MAX_ROWS", DECODE_MAX_ROWS),
                ("DEC_PASS_SPLIT_MIN_HC", DECODE_PASS_SPLIT_MIN_HC),
                ("DEC_WARPS", DECODE_THREADS as usize / 32),
            ],
        );
        super::super::assert_defines(
            "flash_attention.cu",
            FLASH_ATTENTION,
            &[
                ("FA_WARPS", FLASH_THREADS as usize / 32),
                ("FA_KEYS", FLASH_KEYS),
                ("FA_STAGES", FLASH_STAGES),
            ],
        );
        super::super::assert_defines(
            "flash_decode.cu",
            FLASH_DECODE,
            &[
                ("FD_WARPS", FLASH_DECODE_THREADS as usize / 32),
                ("FD_MAX_GROUP", FLASH_DECODE_MAX_GROUP),
            ],
        );
        for hd in FLASH_DECODE_HEAD_DIMS {
            assert!(FLASH_DECODE.contains(&format!("\nFLASH_DECODE({hd})")));
        }
    }
}
