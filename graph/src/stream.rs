//! Streamed weights in the typed model: the `ai.kiln` ExternalWeight nodes of a GPU session's import
//! ([`crate::import::stream_external_initializers`]), read into memory where a CPU node needs them, and the casts the
//! float16 pass puts after them folded into the read.

use kiln_ops::external_weight::{ExternalWeight, Layout};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::TypedOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::konst::Const;

use crate::error::{Error, ErrorKind, Result};
use crate::import::{ExternalDataResolver, WeightSource};

/// The ExternalWeight nodes of a model.
pub fn external_weights(model: &TypedModel) -> Vec<usize> {
    model.nodes().iter().filter(|n| n.op_is::<ExternalWeight>()).map(|n| n.id).collect()
}

/// Reads `n` bytes of a weight's stored data from byte `at` of it. Errors name the weight and its file.
pub async fn read_exact(source: &dyn ExternalDataResolver, w: &ExternalWeight, at: u64, n: u64) -> Result<Vec<u8>> {
    let offset = w
        .offset
        .checked_add(at)
        .ok_or_else(|| Error::invalid_model(format!("weight `{}`: offset {} + {at} overflows", w.tensor, w.offset)))?;
    let piece = source.read_range(&w.location, offset, n).await.map_err(|e| {
        Error::new(e.kind, format!("weight `{}` (external data `{}`): {}", w.tensor, w.location, e.message))
    })?;
    if piece.len() as u64 != n {
        return Err(Error::io(format!(
            "weight `{}`: external data `{}` returned {} bytes at {offset}, expected {n}",
            w.tensor,
            w.location,
            piece.len()
        )));
    }
    Ok(piece)
}

/// Reads `w.length` bytes of a weight's stored data from `at`, one range of at most `chunk` bytes per read, and
/// calls `f` with each piece and its byte offset in the stored data. Errors name the weight and its file.
pub async fn for_each_chunk(
    source: &dyn ExternalDataResolver,
    w: &ExternalWeight,
    chunk: u64,
    mut f: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let chunk = (chunk.max(8) / 8) * 8;
    let mut at = 0u64;
    while at < w.length {
        let n = (w.length - at).min(chunk);
        let piece = read_exact(source, w, at, n).await?;
        f(&piece, at)?;
        at += n;
    }
    Ok(())
}

/// A weight read whole into a host tensor (in bounded reads).
pub async fn read_weight(source: &dyn ExternalDataResolver, w: &ExternalWeight, chunk: u64) -> Result<Tensor> {
    let len = usize::try_from(w.length)
        .map_err(|_| Error::io(format!("weight `{}`: {} bytes do not fit in memory", w.tensor, w.length)))?;
    let mut bytes = Vec::with_capacity(len);
    for_each_chunk(source, w, chunk, |piece, _| {
        bytes.extend_from_slice(piece);
        Ok(())
    })
    .await?;
    w.tensor(&bytes).map_err(|e| Error::from_tract(ErrorKind::InvalidModel, &format!("weight `{}`", w.tensor), &e))
}

/// Replaces the ExternalWeight nodes `ids` of `model` by constants read from `source`. Returns the bytes read.
pub async fn materialize(
    model: &mut TypedModel,
    ids: &[usize],
    source: Option<&WeightSource>,
    chunk: u64,
) -> Result<u64> {
    let mut read = 0u64;
    for &id in ids {
        let Some(w) = model.nodes().get(id).and_then(|n| n.op_as::<ExternalWeight>()).cloned() else { continue };
        let source = source.ok_or_else(|| {
            Error::invalid_argument(format!(
                "weight `{}` keeps its data in external file `{}`, but no external data was provided",
                w.tensor, w.location
            ))
        })?;
        let t = Arc::new(read_weight(&*source.0, &w, chunk).await?);
        read += w.length;
        let konst = Const::new(t.clone())
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, &format!("weight `{}`", w.tensor), &e))?;
        let fact = konst
            .output_facts(&[])
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, &format!("weight `{}`", w.tensor), &e))?
            .remove(0);
        let node = &mut model.nodes[id];
        node.op = Box::new(konst);
        if let Some(o) = node.outputs.get_mut(0) {
            o.fact = fact;
        }
    }
    Ok(read)
}

/// Every ExternalWeight of `model` read into memory (a CPU session, or the CPU fallback of a GPU one).
pub async fn materialize_all(model: &mut TypedModel, source: Option<&WeightSource>, chunk: u64) -> Result<u64> {
    let ids = external_weights(model);
    materialize(model, &ids, source, chunk).await
}

/// `Cast(ExternalWeight float16)` to float32 becomes an ExternalWeight read as float32 (converted chunk by chunk
/// while it is uploaded): no cast of the whole weight at each run. Returns one log line per cast.
pub fn fold_external_casts(model: &mut TypedModel) -> TractResult<Vec<String>> {
    let mut log = vec![];
    let casts: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Cast>()).map(|n| n.id).collect();
    for id in casts {
        let node = model.node(id);
        let Some(cast) = node.op_as::<Cast>() else { continue };
        let [input] = node.inputs.as_slice() else { continue };
        let Some(w) = model.node(input.node).op_as::<ExternalWeight>() else { continue };
        if cast.to != DatumType::F32 || w.layout != Layout::Plain || w.stored_datum_type()? != DatumType::F16 {
            continue;
        }
        let folded = w.with_layout(Layout::F16ToF32);
        let mut patch = TypedModelPatch::new(format!("read {} as float32", w.tensor));
        let y = patch.wire_node(format!("{}.f32", model.node(input.node).name), folded, &[])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        log.push(format!("external weight `{}` read as float32 (its cast folded into the upload)", w.tensor));
        patch.apply(model)?;
    }
    if !log.is_empty() {
        model.compact()?;
    }
    Ok(log)
}
