//! ONNX Pad (opset 11+). tract's requires `constant_value` to be rank 0; onnxruntime (and onnx's own function
//! bodies, e.g. Attention's expansion padding its mask with `-inf`) also pass a one-element 1D tensor. kiln's
//! accepts any one-element `constant_value` and otherwise matches tract's (constant `pads`/`axes`, modes constant,
//! reflect, edge). Opsets before 11 (pads as an attribute) go to tract's builder.

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::array::{Pad as TractPad, PadMode};

use crate::BuildResult;

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if ctx.onnx_operator_set_version < 11 {
        return crate::tract_builder(ctx, node);
    }
    let mode = match node.get_attr_opt::<&str>("mode")? {
        None | Some("constant") => None,
        Some("reflect") => Some(PadMode::Reflect),
        Some("edge") => Some(PadMode::Edge),
        Some(other) => bail!("Pad: mode `{other}` is not supported (constant, reflect, edge)"),
    };
    let mut inputs = optional_inputs(node).skip(2);
    let constant_input = inputs.next().flatten();
    let axes_input = inputs.next().flatten();
    Ok((expand(Pad { mode, constant_input, axes_input }), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Pad {
    /// `None`: constant mode (the value from `constant_value`, or zero).
    pub mode: Option<PadMode>,
    pub constant_input: Option<usize>,
    pub axes_input: Option<usize>,
}

fn axes_of(axes: &Tensor, rank: usize) -> TractResult<Vec<usize>> {
    let axes = axes.cast_to::<i64>()?;
    let axes = axes.try_as_plain_ram()?;
    axes.as_slice::<i64>()?
        .iter()
        .map(|&a| {
            let r = rank as i64;
            ensure!(a >= -r && a < r, "Pad: axis {a} is out of range for rank {rank}");
            Ok((if a < 0 { a + r } else { a }) as usize)
        })
        .collect()
}

impl Expansion for Pad {
    fn name(&self) -> StaticName {
        "Pad".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + self.constant_input.is_some() as usize + self.axes_input.is_some() as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        s.equals(&inputs[1].rank, 1)?;
        if let Some(c) = self.constant_input {
            s.equals(&inputs[0].datum_type, &inputs[c].datum_type)?;
        }
        let axes_ix = self.axes_input;
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            match axes_ix {
                Some(a) => s.given(&inputs[a].value, move |s, axes| {
                    let axes = axes_of(&axes, rank)?;
                    output_shape(s, inputs, outputs, rank, axes)
                }),
                None => output_shape(s, inputs, outputs, rank, (0..rank).collect()),
            }
        })
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        let mode = match &self.mode {
            Some(m) => m.clone(),
            None => {
                let value = match self.constant_input {
                    Some(c) => {
                        let k = model
                            .outlet_fact(inputs[c])?
                            .konst
                            .clone()
                            .context("Pad: constant_value must be known at load time")?;
                        ensure!(k.len() == 1, "Pad: constant_value must hold one value, got shape {:?}", k.shape());
                        k.into_tensor().into_shape(&[])?.cast_to_dt(dt)?.into_owned()
                    }
                    None => Tensor::zero_scalar_dt(dt)?,
                };
                PadMode::Constant(value.into_arc_tensor())
            }
        };
        let rank = model.outlet_fact(inputs[0])?.rank();
        let axes = match self.axes_input {
            Some(a) => axes_of(
                model.outlet_fact(inputs[a])?.konst.as_ref().context("Pad: axes must be known at load time")?,
                rank,
            )?,
            None => (0..rank).collect(),
        };
        let pads = model.outlet_fact(inputs[1])?.konst.clone().context("Pad: pads must be known at load time")?;
        let pads = pads.cast_to::<i64>()?;
        let pads = pads.try_as_plain_ram()?;
        let pads = pads.as_slice::<i64>()?;
        ensure!(pads.len() == 2 * axes.len(), "Pad: {} pads for {} axes", pads.len(), axes.len());
        let mut fixed = vec![(0usize, 0usize); rank];
        for (ix, &axis) in axes.iter().enumerate() {
            let (l, r) = (pads[ix], pads[ix + axes.len()]);
            ensure!(l >= 0 && r >= 0, "Pad: negative pads ({l}, {r}) are not supported");
            fixed[axis] = (l as usize, r as usize);
        }
        model.wire_node(name, TractPad { mode, pads: fixed }, &inputs[0..1])
    }
}

fn output_shape<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    rank: usize,
    axes: Vec<usize>,
) -> InferenceResult {
    for ax in (0..rank).filter(|ax| !axes.contains(ax)) {
        s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
    }
    s.given(&inputs[1].value, move |s, pads| {
        let pads = pads.cast_to::<TDim>()?;
        let pads = pads.try_as_plain_ram()?;
        let pads = pads.as_slice::<TDim>()?;
        ensure!(pads.len() == 2 * axes.len(), "Pad: {} pads for {} axes", pads.len(), axes.len());
        let n = axes.len();
        for (ix, axis) in axes.iter().enumerate() {
            s.equals(&outputs[0].shape[*axis], inputs[0].shape[*axis].bex() + pads[ix].clone() + pads[ix + n].clone())?;
        }
        Ok(())
    })
}
