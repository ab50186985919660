//! `ai.kiln` ExternalWeight: a weight whose bytes stay in the model's external data until a provider needs them.
//!
//! A GPU session imports large external initializers as nodes of this op (kiln-graph's streaming import) instead of
//! reading them into memory: the op has no input and a fixed output fact, and says where the bytes are (location,
//! offset, length, element type, dims). The GPU backend fills the weight's buffer from the data source chunk by chunk;
//! a weight a CPU node reads is replaced by a constant read from the source. Evaluating the op itself is an error
//! ("not loaded"): nothing runs it before it is materialised.
//!
//! The stored bytes can be viewed as the output differently ([`Layout`]): float16 read as float32 (the float16
//! pass), or the bytes as little-endian u32 words (MatMulNBits / MatMulInteger's packed weights), so such rewrites
//! need not read the weight.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{self, NodeProto};
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

/// The op's domain and type in a rewritten ONNX graph.
pub const DOMAIN: &str = "ai.kiln";
pub const OP_TYPE: &str = "ExternalWeight";

/// How the stored bytes become the output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The stored element type and dims, as ONNX raw data.
    Plain,
    /// Stored float16, output float32 (same dims).
    F16ToF32,
    /// The stored bytes as little-endian u32 words, zero-padded to a whole word: output u32 `[ceil(length / 4)]`.
    Words,
    /// Stored float32 or float16 `[.., K, N]`, output the same type with its last two axes swapped, `[.., N, K]` (the
    /// one-row matmul kernel's weight layout; the GPU backend transposes blocks of rows as it uploads).
    Transposed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalWeight {
    /// The initializer's name (for messages).
    pub tensor: String,
    pub location: String,
    pub offset: u64,
    /// Bytes stored.
    pub length: u64,
    /// ONNX `TensorProto.DataType` of the stored data.
    pub data_type: i32,
    /// Stored dims.
    pub dims: TVec<usize>,
    pub layout: Layout,
    /// A part of the stored tensor along one axis: (axis, start, end) (a weight over the GPU's binding limit is
    /// split into parts, kiln-graph's lower_gpu::split_large_weights). Not with `Words`.
    pub slice: Option<(usize, usize, usize)>,
}

/// Where a sliced weight's bytes are in the stored tensor: `outer` rows of `row_bytes`, the part being `len` bytes
/// from `start` in each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    pub outer: u64,
    pub row_bytes: u64,
    pub start: u64,
    pub len: u64,
}

/// The element type of an ONNX data type code.
pub fn datum_type_of(code: i32) -> TractResult<DatumType> {
    let dt = pb::tensor_proto::DataType::try_from(code).map_err(|_| format_err!("unknown ONNX data type {code}"))?;
    DatumType::try_from(dt)
}

impl ExternalWeight {
    pub fn stored_datum_type(&self) -> TractResult<DatumType> {
        datum_type_of(self.data_type)
    }

    /// The output's element type and dims.
    pub fn output(&self) -> TractResult<(DatumType, TVec<usize>)> {
        let stored = self.stored_datum_type()?;
        let mut dims = self.dims.clone();
        if let Some((axis, start, end)) = self.slice {
            ensure!(
                axis < dims.len() && start < end && end <= dims[axis] && self.layout != Layout::Words,
                "external weight `{}`: slice {start}..{end} of axis {axis} of {:?} ({:?})",
                self.tensor,
                self.dims,
                self.layout
            );
            dims[axis] = end - start;
        }
        Ok(match self.layout {
            Layout::Plain => (stored, dims),
            Layout::F16ToF32 => {
                ensure!(stored == DatumType::F16, "external weight `{}`: F16ToF32 on {stored:?} data", self.tensor);
                (DatumType::F32, dims)
            }
            Layout::Words => (DatumType::U32, tvec![(self.length as usize).div_ceil(4)]),
            Layout::Transposed => {
                let r = dims.len();
                ensure!(
                    r >= 2 && self.slice.is_none() && matches!(stored, DatumType::F32 | DatumType::F16),
                    "external weight `{}`: Transposed on {stored:?} {:?} (slice {:?})",
                    self.tensor,
                    self.dims,
                    self.slice
                );
                dims.swap(r - 2, r - 1);
                (stored, dims)
            }
        })
    }

    /// Where a sliced weight's part is in the stored bytes (`None` for a whole weight).
    pub fn segments(&self) -> TractResult<Option<Segments>> {
        let Some((axis, start, end)) = self.slice else { return Ok(None) };
        self.output()?;
        let size = self.stored_datum_type()?.size_of() as u64;
        let outer: usize = self.dims[..axis].iter().product();
        let inner: usize = self.dims[axis + 1..].iter().product();
        let row = (self.dims[axis] * inner) as u64 * size;
        Ok(Some(Segments {
            outer: outer as u64,
            row_bytes: row,
            start: (start * inner) as u64 * size,
            len: ((end - start) * inner) as u64 * size,
        }))
    }

    pub fn fact(&self) -> TractResult<TypedFact> {
        let (dt, shape) = self.output()?;
        Ok(dt.fact(shape))
    }

    /// Bytes per stored element (1 for `Words`, whose chunks may cut anywhere on a word boundary).
    pub fn stored_element_size(&self) -> TractResult<usize> {
        Ok(self.stored_datum_type()?.size_of())
    }

    /// The same weight viewed through another layout.
    pub fn with_layout(&self, layout: Layout) -> ExternalWeight {
        ExternalWeight { layout, ..self.clone() }
    }

    /// Checks that `length` is what the dims and element type need.
    pub fn check(&self) -> TractResult<()> {
        let dt = self.stored_datum_type()?;
        ensure!(dt != DatumType::String, "external weight `{}`: string tensors cannot be streamed", self.tensor);
        let n: usize = self.dims.iter().product();
        let want = (n * dt.size_of()) as u64;
        ensure!(
            want == self.length,
            "external weight `{}`: {} bytes in `{}`, but its dims {:?} of {dt:?} need {want}",
            self.tensor,
            self.length,
            self.location,
            self.dims
        );
        Ok(())
    }

    /// A piece of the output, from `bytes` of stored data starting at element `first` of the stored tensor (for
    /// `Words`, at byte `first`): a 1-D tensor of the output element type. Whole stored elements only (a `Words`
    /// piece is padded with zeros to a whole word).
    pub fn chunk_tensor(&self, bytes: &[u8]) -> TractResult<Tensor> {
        let stored = self.stored_datum_type()?;
        match self.layout {
            Layout::Words => {
                let mut words = vec![0u32; bytes.len().div_ceil(4)];
                for (i, b) in bytes.iter().enumerate() {
                    words[i / 4] |= (*b as u32) << (8 * (i % 4));
                }
                Ok(tensor1(&words))
            }
            Layout::Plain | Layout::F16ToF32 | Layout::Transposed => {
                let size = stored.size_of();
                ensure!(
                    bytes.len().is_multiple_of(size),
                    "external weight `{}`: a piece of {} bytes is not whole {stored:?} elements",
                    self.tensor,
                    bytes.len()
                );
                let t = if stored == DatumType::F16 {
                    // float16 (the float16 pass's streamed weights) without the TensorProto copy
                    let halves: Vec<f16> =
                        bytes.chunks_exact(2).map(|h| f16::from_bits(u16::from_le_bytes([h[0], h[1]]))).collect();
                    tensor1(&halves)
                } else {
                    let proto = pb::TensorProto {
                        dims: vec![(bytes.len() / size) as i64],
                        data_type: self.data_type,
                        raw_data: bytes.to_vec(),
                        ..Default::default()
                    };
                    tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, &proto, None)?
                };
                if self.layout == Layout::F16ToF32 {
                    t.cast_to_dt(DatumType::F32).map(|t| t.into_owned())
                } else {
                    Ok(t)
                }
            }
        }
    }

    /// The whole output tensor from all the stored bytes.
    pub fn tensor(&self, bytes: &[u8]) -> TractResult<Tensor> {
        ensure!(
            bytes.len() as u64 == self.length,
            "external weight `{}`: read {} bytes of `{}`, expected {}",
            self.tensor,
            bytes.len(),
            self.location,
            self.length
        );
        let (_, shape) = self.output()?;
        if self.layout == Layout::Transposed {
            let r = self.dims.len();
            return self.with_layout(Layout::Plain).tensor(bytes)?.move_axis(r - 1, r - 2);
        }
        match self.slice {
            Some((axis, start, end)) => {
                Ok(self.chunk_tensor(bytes)?.into_shape(&self.dims)?.slice(axis, start, end)?.into_shape(&shape)?)
            }
            None => self.chunk_tensor(bytes)?.into_shape(&shape),
        }
    }
}

impl Op for ExternalWeight {
    fn name(&self) -> StaticName {
        "KilnExternalWeight".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "`{}`: {} bytes of `{}` at {} ({:?}, slice {:?})",
            self.tensor, self.length, self.location, self.offset, self.layout, self.slice
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for ExternalWeight {
    not_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!(
            "weight `{}` (external data `{}`) was not loaded: it is streamed to the GPU, and nothing read it into memory",
            self.tensor,
            self.location
        )
    }
}

impl TypedOp for ExternalWeight {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.is_empty(), "KilnExternalWeight takes no input");
        Ok(tvec!(self.fact()?))
    }
    as_op!();
}

impl Expansion for ExternalWeight {
    fn name(&self) -> StaticName {
        "KilnExternalWeight".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 0)?;
        check_output_arity(outputs, 1)?;
        let (dt, shape) = self.output()?;
        s.equals(&outputs[0].datum_type, dt)?;
        s.equals(&outputs[0].shape, ShapeFactoid::from(shape.iter().map(|d| d.to_dim()).collect::<TVec<_>>()))?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, _inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), &[])
    }
}

/// Builds the op from a node of the `ai.kiln` domain; other domains' `ExternalWeight` is nobody's.
pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != DOMAIN {
        return crate::tract_builder(ctx, node);
    }
    let tensor = node.output.first().cloned().unwrap_or_default();
    let location: String = node.get_attr("location")?;
    let offset: i64 = node.get_attr("offset")?;
    let length: i64 = node.get_attr("length")?;
    let data_type: i64 = node.get_attr("data_type")?;
    let dims: TVec<i64> = node.get_attr_opt_tvec("dims")?.unwrap_or_default();
    ensure!(offset >= 0 && length >= 0, "ExternalWeight `{tensor}`: negative offset or length");
    ensure!(dims.iter().all(|d| *d >= 0), "ExternalWeight `{tensor}`: negative dims {dims:?}");
    let op = ExternalWeight {
        tensor,
        location,
        offset: offset as u64,
        length: length as u64,
        data_type: data_type as i32,
        dims: dims.iter().map(|d| *d as usize).collect(),
        layout: Layout::Plain,
        slice: None,
    };
    op.check()?;
    Ok((expand(op), vec![]))
}

/// The ONNX node that stands for an external initializer (kiln-graph's streaming import).
pub fn node_proto(
    tensor: &str,
    location: &str,
    offset: u64,
    length: u64,
    data_type: i32,
    dims: &[i64],
) -> pb::NodeProto {
    let attr = |name: &str| pb::AttributeProto { name: name.into(), ..Default::default() };
    use pb::attribute_proto::AttributeType;
    pb::NodeProto {
        name: format!("kiln_external_weight/{tensor}"),
        op_type: OP_TYPE.into(),
        domain: DOMAIN.into(),
        output: vec![tensor.into()],
        attribute: vec![
            pb::AttributeProto {
                s: location.as_bytes().to_vec(),
                r#type: AttributeType::String as i32,
                ..attr("location")
            },
            pb::AttributeProto { i: offset as i64, r#type: AttributeType::Int as i32, ..attr("offset") },
            pb::AttributeProto { i: length as i64, r#type: AttributeType::Int as i32, ..attr("length") },
            pb::AttributeProto { i: data_type as i64, r#type: AttributeType::Int as i32, ..attr("data_type") },
            pb::AttributeProto { ints: dims.to_vec(), r#type: AttributeType::Ints as i32, ..attr("dims") },
        ],
        ..Default::default()
    }
}
