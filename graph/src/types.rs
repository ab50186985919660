//! Element types and tensor metadata as onnxruntime presents them.

use crate::error::{Error, Result};
use tract_onnx::prelude::DatumType;

/// The element types kiln accepts and returns (onnxruntime-web's `Tensor.Type` names in [`ElementType::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    F32,
    F16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
    String,
}

impl ElementType {
    pub const ALL: [ElementType; 13] = [
        ElementType::F32,
        ElementType::F16,
        ElementType::F64,
        ElementType::I64,
        ElementType::I32,
        ElementType::I16,
        ElementType::I8,
        ElementType::U8,
        ElementType::U16,
        ElementType::U32,
        ElementType::U64,
        ElementType::Bool,
        ElementType::String,
    ];

    /// onnxruntime-web's name for the type (`'float32'`, `'int64'`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            ElementType::F32 => "float32",
            ElementType::F16 => "float16",
            ElementType::F64 => "float64",
            ElementType::I64 => "int64",
            ElementType::I32 => "int32",
            ElementType::I16 => "int16",
            ElementType::I8 => "int8",
            ElementType::U8 => "uint8",
            ElementType::U16 => "uint16",
            ElementType::U32 => "uint32",
            ElementType::U64 => "uint64",
            ElementType::Bool => "bool",
            ElementType::String => "string",
        }
    }

    pub fn from_name(name: &str) -> Option<ElementType> {
        ElementType::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// The ONNX `TensorProto.DataType` code.
    pub fn onnx_code(&self) -> i32 {
        match self {
            ElementType::F32 => 1,
            ElementType::U8 => 2,
            ElementType::I8 => 3,
            ElementType::U16 => 4,
            ElementType::I16 => 5,
            ElementType::I32 => 6,
            ElementType::I64 => 7,
            ElementType::String => 8,
            ElementType::Bool => 9,
            ElementType::F16 => 10,
            ElementType::F64 => 11,
            ElementType::U32 => 12,
            ElementType::U64 => 13,
        }
    }

    pub fn from_onnx_code(code: i32) -> Result<ElementType> {
        ElementType::ALL.iter().copied().find(|t| t.onnx_code() == code).ok_or_else(|| {
            Error::not_implemented(format!(
                "element type {} ({}) is not supported (supported: {})",
                onnx_type_name(code),
                code,
                ElementType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn to_datum_type(&self) -> DatumType {
        match self {
            ElementType::F32 => DatumType::F32,
            ElementType::F16 => DatumType::F16,
            ElementType::F64 => DatumType::F64,
            ElementType::I64 => DatumType::I64,
            ElementType::I32 => DatumType::I32,
            ElementType::I16 => DatumType::I16,
            ElementType::I8 => DatumType::I8,
            ElementType::U8 => DatumType::U8,
            ElementType::U16 => DatumType::U16,
            ElementType::U32 => DatumType::U32,
            ElementType::U64 => DatumType::U64,
            ElementType::Bool => DatumType::Bool,
            ElementType::String => DatumType::String,
        }
    }

    pub fn from_datum_type(dt: DatumType) -> Result<ElementType> {
        Ok(match dt.unquantized() {
            DatumType::F32 => ElementType::F32,
            DatumType::F16 => ElementType::F16,
            DatumType::F64 => ElementType::F64,
            DatumType::I64 => ElementType::I64,
            DatumType::I32 => ElementType::I32,
            DatumType::I16 => ElementType::I16,
            DatumType::I8 => ElementType::I8,
            DatumType::U8 => ElementType::U8,
            DatumType::U16 => ElementType::U16,
            DatumType::U32 => ElementType::U32,
            DatumType::U64 => ElementType::U64,
            DatumType::Bool => ElementType::Bool,
            DatumType::String => ElementType::String,
            other => return Err(Error::not_implemented(format!("element type {other:?} is not supported by kiln"))),
        })
    }

    /// Size of one element in bytes (0 for strings).
    pub fn size_of(&self) -> usize {
        match self {
            ElementType::F64 | ElementType::I64 | ElementType::U64 => 8,
            ElementType::F32 | ElementType::I32 | ElementType::U32 => 4,
            ElementType::F16 | ElementType::I16 | ElementType::U16 => 2,
            ElementType::I8 | ElementType::U8 | ElementType::Bool => 1,
            ElementType::String => 0,
        }
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// ONNX's name for a `TensorProto.DataType` code, for messages.
pub fn onnx_type_name(code: i32) -> &'static str {
    match code {
        0 => "UNDEFINED",
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        14 => "COMPLEX64",
        15 => "COMPLEX128",
        16 => "BFLOAT16",
        17 => "FLOAT8E4M3FN",
        18 => "FLOAT8E4M3FNUZ",
        19 => "FLOAT8E5M2",
        20 => "FLOAT8E5M2FNUZ",
        21 => "UINT4",
        22 => "INT4",
        23 => "FLOAT4E2M1",
        _ => "UNKNOWN",
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// A named dimension (`dim_param`), e.g. `batch_size`.
    Symbolic(String),
    /// Declared with neither a value nor a name.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbolic(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// Name, element type and declared shape of a model input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    /// `None` when the model declares a type kiln cannot represent (the message says which).
    pub element_type: Option<ElementType>,
    /// The raw ONNX `TensorProto.DataType` code.
    pub onnx_type: i32,
    /// `None` when the model does not declare a shape (any rank accepted).
    pub shape: Option<Vec<Dim>>,
}

impl ValueInfo {
    pub fn shape_string(&self) -> String {
        match &self.shape {
            None => "(any)".to_string(),
            Some(s) => format!("[{}]", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        }
    }
}
