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

/// Fills each job's buffer from `source`, `chunk` bytes of stored data per read. Natively the queue's staging
/// memory is recycled every `window` bytes (a submit and a wait), as for the constants' uploads.
pub(crate) async fn stream_weights(
    ctx: &Context,
    jobs: &[StreamJob],
    source: Option<&WeightSource>,
    chunk: u64,
    window: u64,
) -> Result<u64> {
    let mut staged = 0u64;
    let mut read = 0u64;
    for job in jobs {
        let w = &job.weight;
        let source = source.ok_or_else(|| {
            Error::invalid_argument(format!(
                "weight `{}` keeps its data in external file `{}`, but no external data was provided",
                w.tensor, w.location
            ))
        })?;
        let mut dst = 0u64;
        let size = job.buffer.size();
        // the stored bytes are the GPU's as they are (f32 / i32 / u32 / f16, or words): written without a copy
        let as_is = match w.layout {
            Layout::Words => true,
            Layout::F16ToF32 => false,
            Layout::Plain => {
                matches!(w.stored_datum_type(), Ok(DatumType::F32 | DatumType::I32 | DatumType::U32 | DatumType::F16))
            }
        };
        kiln_graph::stream::for_each_chunk(&*source.0, w, chunk, |piece, _| {
            let converted;
            let mut padded;
            let mut bytes: &[u8] = if as_is {
                piece
            } else {
                let t =
                    w.chunk_tensor(piece).map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {e}", w.tensor)))?;
                converted = kiln_wgsl::exec::host_bytes(&t)
                    .map_err(|e| Error::runtime(format!("webgpu: weight `{}`: {}", w.tensor, e.message)))?;
                &converted
            };
            // write_buffer wants a multiple of 4 bytes (the last piece of an odd-sized weight)
            if !bytes.len().is_multiple_of(4) {
                padded = bytes.to_vec();
                padded.resize(bytes.len().div_ceil(4) * 4, 0);
                bytes = &padded;
            }
            if dst + bytes.len() as u64 > size {
                return Err(Error::runtime(format!(
                    "webgpu: weight `{}`: {} bytes do not fit its {size}-byte buffer",
                    w.tensor,
                    dst + bytes.len() as u64
                )));
            }
            ctx.queue.write_buffer(&job.buffer, dst, bytes);
            dst += bytes.len() as u64;
            staged += bytes.len() as u64;
            if staged >= window {
                staged = 0;
                #[cfg(not(target_arch = "wasm32"))]
                {
                    ctx.queue.submit([]);
                    ctx.device
                        .poll(kiln_wgsl::wgpu::PollType::Wait { submission_index: None, timeout: None })
                        .map_err(|e| Error::runtime(format!("webgpu: uploading weights: {e}")))?;
                }
            }
            Ok(())
        })
        .await?;
        read += w.length;
    }
    if !jobs.is_empty() {
        ctx.queue.submit([]);
    }
    ctx.take_error().map_err(|e| Error::runtime(e.message))?;
    Ok(read)
}
