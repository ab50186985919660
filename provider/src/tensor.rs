//! kiln's tensor: an element type, a shape and the data, as onnxruntime-web's `Tensor`.

use half::f16;
use kiln_graph::tract_onnx::prelude::{Datum, DatumType, Tensor as TractTensor, TractResult};
use kiln_graph::{ElementType, Error, ErrorKind, Result};

/// Rust element types that map to a kiln [`ElementType`].
pub trait Element: Datum + Clone {
    const TYPE: ElementType;
}
macro_rules! element {
    ($($t:ty => $e:ident),*) => { $(impl Element for $t { const TYPE: ElementType = ElementType::$e; })* };
}
element!(f32 => F32, f16 => F16, f64 => F64, i64 => I64, i32 => I32, i16 => I16, i8 => I8, u8 => U8, u16 => U16,
    u32 => U32, u64 => U64, bool => Bool, String => String);

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    inner: TractTensor,
}

fn check_len(dims: &[usize], len: usize) -> Result<()> {
    let expected = dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    match expected {
        Some(n) if n == len => Ok(()),
        Some(n) => Err(Error::invalid_argument(format!("tensor data has {len} elements but dims {dims:?} need {n}"))),
        None => Err(Error::invalid_argument(format!("tensor dims {dims:?} overflow"))),
    }
}

impl Tensor {
    /// A tensor of `dims` holding `data` in row-major order.
    pub fn from_vec<T: Element>(dims: &[usize], data: Vec<T>) -> Result<Tensor> {
        check_len(dims, data.len())?;
        let t: TractResult<TractTensor> =
            kiln_graph::tract_onnx::prelude::tract_ndarray::ArrayD::from_shape_vec(dims.to_vec(), data)
                .map(TractTensor::from)
                .map_err(|e| e.into());
        t.map(|inner| Tensor { inner })
            .map_err(|e| Error::from_tract(ErrorKind::InvalidArgument, "building a tensor", &e))
    }

    /// A scalar (rank 0) tensor.
    pub fn scalar<T: Element>(value: T) -> Tensor {
        Tensor { inner: TractTensor::from(kiln_graph::tract_onnx::prelude::tract_ndarray::arr0(value)) }
    }

    /// A tensor from raw little-endian bytes of a numeric element type.
    pub fn from_bytes(element_type: ElementType, dims: &[usize], bytes: &[u8]) -> Result<Tensor> {
        if element_type == ElementType::String {
            return Err(Error::invalid_argument("string tensors cannot be built from bytes"));
        }
        let n = dims.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
        match n.and_then(|n| n.checked_mul(element_type.size_of())) {
            Some(b) if b == bytes.len() => {}
            _ => {
                return Err(Error::invalid_argument(format!(
                    "{} bytes do not hold a {} tensor of dims {dims:?}",
                    bytes.len(),
                    element_type
                )))
            }
        }
        let inner = unsafe { TractTensor::from_raw_dt(element_type.to_datum_type(), dims, bytes) }
            .map_err(|e| Error::from_tract(ErrorKind::InvalidArgument, "building a tensor", &e))?;
        Ok(Tensor { inner })
    }

    pub fn from_tract(inner: TractTensor) -> Result<Tensor> {
        ElementType::from_datum_type(inner.datum_type())?;
        let inner = if inner.datum_type().is_quantized() {
            let dt = inner.datum_type().unquantized();
            inner.cast_to_dt(dt).map_err(|e| Error::from_tract(ErrorKind::Runtime, "unquantizing", &e))?.into_owned()
        } else {
            inner
        };
        Ok(Tensor { inner })
    }
    pub fn as_tract(&self) -> &TractTensor {
        &self.inner
    }
    pub fn into_tract(self) -> TractTensor {
        self.inner
    }

    pub fn element_type(&self) -> ElementType {
        // Constructors only admit kiln element types.
        ElementType::from_datum_type(self.inner.datum_type()).unwrap_or(ElementType::F32)
    }
    pub fn dims(&self) -> &[usize] {
        self.inner.shape()
    }
    pub fn len(&self) -> usize {
        self.inner.len()
    }
    pub fn is_empty(&self) -> bool {
        self.inner.len() == 0
    }

    /// The data as a slice of `T`; an error names both types when `T` is not the element type.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::TYPE != self.element_type() {
            return Err(Error::invalid_argument(format!(
                "tensor holds {} but {} was asked for",
                self.element_type(),
                T::TYPE
            )));
        }
        let view =
            self.inner.try_as_plain_ram().map_err(|e| Error::from_tract(ErrorKind::Runtime, "tensor data", &e))?;
        view.as_slice::<T>().map_err(|e| Error::from_tract(ErrorKind::Runtime, "tensor data", &e))
    }
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.as_slice::<T>().map(|s| s.to_vec())
    }

    /// Raw little-endian bytes (numeric types only).
    pub fn as_bytes(&self) -> Result<&[u8]> {
        if self.element_type() == ElementType::String {
            return Err(Error::invalid_argument("string tensors have no byte view"));
        }
        Ok(self.inner.as_bytes())
    }

    /// The values converted to f64 (numeric and bool types), for comparisons and reports.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        if self.element_type() == ElementType::String {
            return Err(Error::invalid_argument("a string tensor has no numeric values"));
        }
        let t = self.inner.cast_to_dt(DatumType::F64).map_err(|e| Error::from_tract(ErrorKind::Runtime, "cast", &e))?;
        let view = t.try_as_plain_ram().map_err(|e| Error::from_tract(ErrorKind::Runtime, "cast", &e))?;
        Ok(view.as_slice::<f64>().map_err(|e| Error::from_tract(ErrorKind::Runtime, "cast", &e))?.to_vec())
    }

    /// The values converted to `element_type`.
    pub fn cast(&self, element_type: ElementType) -> Result<Tensor> {
        let t = self
            .inner
            .cast_to_dt(element_type.to_datum_type())
            .map_err(|e| Error::from_tract(ErrorKind::Runtime, "cast", &e))?;
        Ok(Tensor { inner: t.into_owned() })
    }
}

impl Tensor {
    /// Reads a serialized ONNX `TensorProto`; returns its name (possibly empty) and the tensor.
    pub fn from_onnx_proto(bytes: &[u8]) -> Result<(String, Tensor)> {
        let (name, t) = kiln_graph::tensor_from_proto_bytes(bytes)?;
        Ok((name, Tensor::from_tract(t)?))
    }
    /// Serializes as an ONNX `TensorProto`.
    pub fn to_onnx_proto(&self, name: &str) -> Result<Vec<u8>> {
        use prost::Message;
        Ok(kiln_graph::tensor_to_proto(name, &self.inner)?.encode_to_vec())
    }
}
