//! Streamed weights on the GPU backend: an `ai.kiln` ExternalWeight (kiln-graph's streaming import) whose readers
//! are all on the GPU gets its buffer at session creation and is filled from the external data source a bounded
//! range at a time (read, converted to the GPU layout, `queue.write_buffer`), so the weight is never whole in host
//! (or wasm) memory; one a CPU node reads is read into a constant first.

use std::sync::Arc;

use kiln_graph::lower_gpu::{DeviceConst, Lowered};
use kiln_graph::tract_onnx::prelude::*;
use kiln_graph::{Error, Result, WeightSource};
use kiln_ops::external_weight::{ExternalWeight, Layout};
use kiln_wgsl::ops::ToDevice;
use kiln_wgsl::Context;

/// A GPU buffer to fill from a streamed weight.
pub(crate) struct StreamJob {
    pub buffer: Arc<kiln_wgsl::wgpu::Buffer>,
    pub weight: ExternalWeight,
}

/// The streamed weights of a lowered model that some node other than a [`ToDevice`] reads (a CPU node, or a model
/// output): they are read into memory.
pub(crate) fn host_read_weights(lowered: &Lowered) -> Vec<usize> {
    let model = &lowered.model;
    kiln_graph::stream::external_weights(model)
        .into_iter()
        .filter(|id| {
            let node = model.node(*id);
            let is_output = model.outputs.iter().any(|o| o.node == *id);
            is_output || node.outputs[0].successors.iter().any(|s| !model.node(s.node).op_is::<ToDevice>())
        })
        .collect()
}

/// Bytes of the buffer a streamed weight needs on the GPU (its output in the GPU layout, whole u32 words).
pub(crate) fn gpu_bytes(w: &ExternalWeight) -> Result<(DatumType, TVec<usize>, u64)> {
    let (dt, shape) = w.output().map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {e}", w.tensor)))?;
    let n: usize = shape.iter().product();
    let bytes = (n * kiln_wgsl::exec::gpu_size_of(dt)) as u64;
    Ok((dt, shape, bytes.div_ceil(4).max(1) * 4))
}

/// Replaces the streamed weights (all of them read by ToDevice transfers only, once [`host_read_weights`] were
/// materialised) by [`DeviceConst`] placeholders: the plan holds their facts.
pub(crate) fn streamed_to_device_consts(model: &mut TypedModel) {
    for id in kiln_graph::stream::external_weights(model) {
        let node = &mut model.nodes[id];
        let fact = node.outputs[0].fact.without_value();
        node.outputs[0].fact = fact.clone();
        node.op = Box::new(DeviceConst { fact });
    }
}

/// Writes converted pieces of streamed weights into their buffers. Natively the queue's staging memory is recycled
/// every `window` bytes (a submit and a wait), as for the constants' uploads.
struct Writer<'a> {
    ctx: &'a Context,
    staged: u64,
    window: u64,
}

impl Writer<'_> {
    /// Writes whole stored elements of `w` (in its stored layout) at `*dst` of `buffer`, converted to the GPU layout.
    fn write(&mut self, job: &StreamJob, dst: &mut u64, piece: &[u8]) -> Result<()> {
        let w = &job.weight;
        // the stored bytes are the GPU's as they are (f32 / i32 / u32 / f16, or words): written without a copy
        let as_is = match w.layout {
            Layout::Words | Layout::Transposed => true,
            Layout::F16ToF32 => false,
            Layout::Plain => {
                matches!(w.stored_datum_type(), Ok(DatumType::F32 | DatumType::I32 | DatumType::U32 | DatumType::F16))
            }
        };
        let converted;
        let padded;
        let mut bytes: &[u8] = if as_is {
            piece
        } else {
            let t = w.chunk_tensor(piece).map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {e}", w.tensor)))?;
            converted = kiln_wgsl::exec::host_bytes(&t)
                .map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {}", w.tensor, e.message)))?;
            &converted
        };
        // write_buffer wants a multiple of 4 bytes (the last piece of an odd-sized weight)
        if !bytes.len().is_multiple_of(4) {
            let mut p = bytes.to_vec();
            p.resize(bytes.len().div_ceil(4) * 4, 0);
            padded = p;
            bytes = &padded;
        }
        let size = job.buffer.size();
        if *dst + bytes.len() as u64 > size {
            return Err(Error::runtime(format!(
                "webgpu: weight `{}`: {} bytes do not fit its {size}-byte buffer",
                w.tensor,
                *dst + bytes.len() as u64
            )));
        }
        self.ctx.queue.write_buffer(&job.buffer, *dst, bytes);
        *dst += bytes.len() as u64;
        self.account(bytes.len() as u64)
    }

    /// Counts `n` bytes staged in the queue, recycling its staging memory once they reach the window (natively).
    fn account(&mut self, n: u64) -> Result<()> {
        self.staged += n;
        if self.staged >= self.window {
            self.staged = 0;
            #[cfg(not(target_arch = "wasm32"))]
            {
                self.ctx.queue.submit([]);
                self.ctx
                    .device
                    .poll(kiln_wgsl::wgpu::PollType::Wait { submission_index: None, timeout: None })
                    .map_err(|e| Error::runtime(format!("webgpu: uploading weights: {e}")))?;
            }
        }
        Ok(())
    }
}

/// Fills the buffer of a [`Layout::Transposed`] weight (stored `[1.., K, N]`, the buffer `[N, K]`): blocks of whole
/// stored rows (as many as `chunk` bytes hold; for float16 an even count, at least two), each transposed on the host;
/// a block that is the whole matrix is written in place, the others written once to a scratch buffer and copied on
/// the GPU into their columns (one write and one dispatch a block). The bytes are the stored element type's (f32 or
/// f16, as the GPU keeps them); float16 needs an even K (whole words; the lowering checks). Reads are at most `chunk`
/// bytes. Returns the bytes read.
async fn write_transposed(
    writer: &mut Writer<'_>,
    job: &StreamJob,
    source: &dyn kiln_graph::ExternalDataResolver,
    chunk: u64,
) -> Result<u64> {
    let w = &job.weight;
    let bad = |m: String| Error::runtime(format!("webgpu: weight `{}`: {m}", w.tensor));
    let es = w.stored_element_size().map_err(|e| bad(e.to_string()))? as u64;
    let r = w.dims.len();
    if r < 2 {
        return Err(bad(format!("transposed but of rank {r}")));
    }
    let (k, n) = (w.dims[r - 2] as u64, w.dims[r - 1] as u64);
    let lead: u64 = w.dims[..r - 2].iter().map(|d| *d as u64).product();
    if lead != 1 || !(k * es).is_multiple_of(4) || k * n * es != w.length {
        return Err(bad(format!("cannot upload {:?} of {es}-byte elements transposed", w.dims)));
    }
    let row = n * es;
    // whole rows per block, an even count for float16 (pieces of whole words)
    let rows = if es == 2 { (chunk / row.max(1)).max(2) & !1 } else { (chunk / row.max(1)).max(1) }.min(k);
    let (mut read, mut k0, mut scratch) = (0, 0, None);
    while k0 < k {
        let kb = rows.min(k - k0);
        // (reads of at most `chunk` bytes: two rows of float16 may be more)
        let mut piece = Vec::with_capacity((kb * row) as usize);
        let mut at = k0 * row;
        while at < (k0 + kb) * row {
            let len = chunk.min((k0 + kb) * row - at);
            piece.extend(kiln_graph::stream::read_exact(source, w, at, len).await?);
            at += len;
        }
        read += piece.len() as u64;
        // piece [kb, n] → block [n, kb] (both kb·n elements: every index below is in range)
        let (kb_, n_, es_) = (kb as usize, n as usize, es as usize);
        let mut block = vec![0u8; piece.len()];
        for i in 0..kb_ {
            for j in 0..n_ {
                let (from, to) = ((i * n_ + j) * es_, (j * kb_ + i) * es_);
                block[to..to + es_].copy_from_slice(&piece[from..from + es_]);
            }
        }
        drop(piece);
        if kb == k {
            let mut dst = 0;
            writer.write(job, &mut dst, &block)?;
        } else {
            // the block in one write to a scratch buffer, then one strided copy on the GPU into its columns (not
            // N writes or N copies: a wide matrix, an LM head, has tens of thousands of rows); whole 4-byte words
            let ctx = writer.ctx;
            let scratch = scratch.get_or_insert_with(|| {
                Arc::new(ctx.device.create_buffer(&kiln_wgsl::wgpu::BufferDescriptor {
                    label: Some("kiln transposed weight block"),
                    size: (rows * row).div_ceil(4) * 4,
                    usage: kiln_wgsl::wgpu::BufferUsages::COPY_DST | kiln_wgsl::wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                }))
            });
            ctx.queue.write_buffer(scratch, 0, &block);
            let word = |x: u64| (x * es / 4) as usize;
            kiln_wgsl::kernels::copy_rows_of_words(
                ctx,
                scratch.clone(),
                job.buffer.clone(),
                n as usize,
                word(kb),
                word(k),
                word(k0),
            )
            .map_err(|e| bad(e.message))?;
            writer.account(block.len() as u64)?;
        }
        k0 += kb;
    }
    Ok(read)
}

/// Fills each job's buffer from `source`, at most `chunk` bytes of stored data per read. The parts of a weight split
/// under the binding limit (sliced ExternalWeights of one stored tensor) are filled together, the tensor read once:
/// each read of whole rows is cut into every part's segments.
pub(crate) async fn stream_weights(
    ctx: &Context,
    jobs: &[StreamJob],
    source: Option<&WeightSource>,
    chunk: u64,
    window: u64,
) -> Result<u64> {
    let chunk = (chunk.max(8) / 8) * 8;
    let mut writer = Writer { ctx, staged: 0, window };
    let mut read = 0u64;
    // sliced parts grouped by the tensor (and axis) they come from
    let mut groups: Vec<Vec<usize>> = vec![];
    for (ix, job) in jobs.iter().enumerate() {
        let w = &job.weight;
        let key = |w: &ExternalWeight| (w.location.clone(), w.offset, w.length, w.dims.clone(), w.slice.map(|s| s.0));
        match groups.iter_mut().find(|g| w.slice.is_some() && key(&jobs[g[0]].weight) == key(w)) {
            Some(g) => g.push(ix),
            None => groups.push(vec![ix]),
        }
    }
    for group in groups {
        let w = &jobs[group[0]].weight;
        let source = source.ok_or_else(|| {
            Error::invalid_argument(format!(
                "weight `{}` keeps its data in external file `{}`, but no external data was provided",
                w.tensor, w.location
            ))
        })?;
        let segments = w.segments().map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {e}", w.tensor)))?;
        let Some(seg) = segments else {
            let job = &jobs[group[0]];
            if w.layout == Layout::Transposed {
                read += write_transposed(&mut writer, job, &*source.0, chunk).await?;
                continue;
            }
            // a whole weight, read in order
            let mut dst = 0u64;
            kiln_graph::stream::for_each_chunk(&*source.0, w, chunk, |piece, _| writer.write(job, &mut dst, piece))
                .await?;
            read += w.length;
            continue;
        };
        let parts: Vec<(&StreamJob, kiln_ops::external_weight::Segments)> = group
            .iter()
            .map(|ix| {
                let job = &jobs[*ix];
                match job.weight.segments() {
                    Ok(Some(s)) => Ok((job, s)),
                    _ => Err(Error::runtime(format!("webgpu: weight `{}`: not a part", job.weight.tensor))),
                }
            })
            .collect::<Result<_>>()?;
        let mut dsts = vec![0u64; parts.len()];
        if seg.row_bytes <= chunk {
            // whole rows per read, each cut into the parts' segments
            let rows = (chunk / seg.row_bytes).max(1);
            let mut o = 0u64;
            while o < seg.outer {
                let n = rows.min(seg.outer - o);
                let piece = kiln_graph::stream::read_exact(&*source.0, w, o * seg.row_bytes, n * seg.row_bytes).await?;
                read += piece.len() as u64;
                for ((job, s), dst) in parts.iter().zip(dsts.iter_mut()) {
                    let mut part = Vec::with_capacity((n * s.len) as usize);
                    for r in 0..n {
                        let at = (r * seg.row_bytes + s.start) as usize;
                        part.extend_from_slice(&piece[at..at + s.len as usize]);
                    }
                    writer.write(job, dst, &part)?;
                }
                o += n;
            }
        } else {
            // rows longer than a read: each part's segment of each row, in pieces
            for ((job, s), dst) in parts.iter().zip(dsts.iter_mut()) {
                for o in 0..seg.outer {
                    let mut at = 0u64;
                    while at < s.len {
                        let n = chunk.min(s.len - at);
                        let from = o * seg.row_bytes + s.start + at;
                        let piece = kiln_graph::stream::read_exact(&*source.0, &job.weight, from, n).await?;
                        read += n;
                        writer.write(job, dst, &piece)?;
                        at += n;
                    }
                }
            }
        }
    }
    if !jobs.is_empty() {
        ctx.queue.submit([]);
    }
    ctx.take_error().map_err(|e| Error::runtime(e.message))?;
    Ok(read)
}
