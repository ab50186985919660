//! A single-file model's large initializers left where they are: [`skeleton`] reads an ONNX file's protobuf through
//! an [`ExternalDataResolver`] a window at a time and returns the model without the raw data of its large
//! initializers, each of which becomes an external-data reference to its own bytes in the model file (location
//! [`MODEL_ITSELF`]). The streaming import ([`crate::stream_external_initializers`]) then treats them like the
//! initializers of `model.onnx.data`: a GPU session streams them from the file into GPU buffers and never holds the
//! whole model in memory (in a browser, never in wasm memory).
//!
//! Only the wire format is walked: ModelProto's `graph` (field 7), GraphProto's `initializer` (field 5) and
//! TensorProto's `raw_data` (field 9). Everything else is copied byte for byte.

use crate::error::{Error, Result};
use crate::import::ExternalDataResolver;

/// The external-data location under which [`skeleton`] refers to the model file's own bytes (a name no model
/// writes: ONNX's locations are relative file paths).
pub const MODEL_ITSELF: &str = "<the model file>";

/// What [`skeleton`] made: the model's bytes without the moved raw data, and how much it moved.
#[derive(Debug, Clone)]
pub struct Skeleton {
    pub bytes: Vec<u8>,
    /// Initializers whose raw data stayed in the model file.
    pub moved: usize,
    /// Their raw data's bytes.
    pub moved_bytes: u64,
}

// protobuf wire types
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

// field numbers (onnx.proto)
const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;
const TENSOR_RAW_DATA: u64 = 9;
const TENSOR_EXTERNAL_DATA: u64 = 13;
const TENSOR_DATA_LOCATION: u64 = 14;
const ENTRY_KEY: u64 = 1;
const ENTRY_VALUE: u64 = 2;
const DATA_LOCATION_EXTERNAL: u64 = 1;

/// Reads the model at `location` of `source` (`size` bytes) and returns it with the raw data of every initializer
/// of its main graph of at least `min_bytes` left in the file: that tensor instead refers to [`MODEL_ITSELF`] at
/// its raw data's offset (data_location EXTERNAL). Reads go through [`ExternalDataResolver::read_range`], at most
/// `window` bytes at a time; the moved data is never read. A file that is no protobuf (a truncated download, a field
/// running past the end) is an error naming the byte where it goes wrong.
pub async fn skeleton(
    source: &dyn ExternalDataResolver,
    location: &str,
    size: u64,
    min_bytes: u64,
    window: u64,
) -> Result<Skeleton> {
    if size == 0 {
        return Err(Error::invalid_model("the model is empty (0 bytes)"));
    }
    let mut r = Reader { source, location, size, window: window.max(64), buf: vec![], buf_at: 0 };
    let mut out = Vec::new();
    let mut sk = Skeleton { bytes: vec![], moved: 0, moved_bytes: 0 };
    let mut at = 0;
    while at < size {
        let f = r.field(at, size).await?;
        if f.number == MODEL_GRAPH && f.wire == LEN {
            let graph = graph(&mut r, &f, min_bytes, &mut sk).await?;
            put_len_field(&mut out, MODEL_GRAPH, &graph);
        } else {
            r.copy(f.start, f.end, &mut out).await?;
        }
        at = f.end;
    }
    sk.bytes = out;
    Ok(sk)
}

/// A GraphProto's fields with its large initializers' raw data moved out.
async fn graph(r: &mut Reader<'_>, g: &Field, min_bytes: u64, sk: &mut Skeleton) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = g.payload;
    while at < g.end {
        let f = r.field(at, g.end).await?;
        // a tensor shorter than min_bytes cannot hold raw data of min_bytes
        if f.number == GRAPH_INITIALIZER && f.wire == LEN && f.end - f.payload >= min_bytes.max(1) {
            let t = tensor(r, &f, min_bytes, sk).await?;
            put_len_field(&mut out, GRAPH_INITIALIZER, &t);
        } else {
            r.copy(f.start, f.end, &mut out).await?;
        }
        at = f.end;
    }
    Ok(out)
}

/// A TensorProto: with raw data of at least `min_bytes`, its other fields plus an external-data reference to
/// that raw data in the model file; else its bytes unchanged.
async fn tensor(r: &mut Reader<'_>, t: &Field, min_bytes: u64, sk: &mut Skeleton) -> Result<Vec<u8>> {
    let mut fields = vec![];
    let mut at = t.payload;
    while at < t.end {
        let f = r.field(at, t.end).await?;
        at = f.end;
        fields.push(f);
    }
    let raw = fields.iter().rev().find(|f| f.number == TENSOR_RAW_DATA && f.wire == LEN);
    let mut out = Vec::new();
    let Some(raw) = raw.filter(|f| f.end - f.payload >= min_bytes).cloned() else {
        r.copy(t.payload, t.end, &mut out).await?;
        return Ok(out);
    };
    for f in &fields {
        if ![TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION].contains(&f.number) {
            r.copy(f.start, f.end, &mut out).await?;
        }
    }
    let length = raw.end - raw.payload;
    for (key, value) in
        [("location", MODEL_ITSELF.to_string()), ("offset", raw.payload.to_string()), ("length", length.to_string())]
    {
        let mut entry = Vec::new();
        put_len_field(&mut entry, ENTRY_KEY, key.as_bytes());
        put_len_field(&mut entry, ENTRY_VALUE, value.as_bytes());
        put_len_field(&mut out, TENSOR_EXTERNAL_DATA, &entry);
    }
    put_varint(&mut out, (TENSOR_DATA_LOCATION << 3) | VARINT as u64);
    put_varint(&mut out, DATA_LOCATION_EXTERNAL);
    sk.moved += 1;
    sk.moved_bytes += length;
    Ok(out)
}

/// One field of a message: its tag's start, its payload's start and its end (byte offsets in the file).
#[derive(Debug, Clone)]
struct Field {
    number: u64,
    wire: u8,
    start: u64,
    payload: u64,
    end: u64,
}

/// Reads the file a window at a time, keeping the last window.
struct Reader<'a> {
    source: &'a dyn ExternalDataResolver,
    location: &'a str,
    size: u64,
    window: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl Reader<'_> {
    /// Bytes `at..at + n` (`n` at most the window) from the current window, reading a new one when needed.
    async fn bytes(&mut self, at: u64, n: u64) -> Result<&[u8]> {
        let have = at >= self.buf_at && at + n <= self.buf_at + self.buf.len() as u64;
        if !have {
            let left = self.size.checked_sub(at).filter(|left| *left >= n);
            let left = left.ok_or_else(|| invalid(at, &format!("{n} bytes run past the end of the file")))?;
            let len = self.window.max(n).min(left);
            let piece =
                self.source.read_range(self.location, at, len).await.map_err(|e| {
                    Error::new(e.kind, format!("reading the model ({} bytes at {at}): {}", len, e.message))
                })?;
            if piece.len() as u64 != len {
                return Err(Error::io(format!(
                    "reading the model: {} bytes at {at}, expected {len} (the file is {} bytes)",
                    piece.len(),
                    self.size
                )));
            }
            self.buf = piece;
            self.buf_at = at;
        }
        // in range: the window held `at..at + n` already, or was just read from `at` with at least n bytes
        let from = (at - self.buf_at) as usize;
        Ok(&self.buf[from..from + n as usize])
    }

    /// A varint at `at` (before `end`): its value and the byte after it.
    async fn varint(&mut self, at: u64, end: u64) -> Result<(u64, u64)> {
        let n = (end - at).min(10);
        let bytes = self.bytes(at, n).await?;
        let mut v = 0u64;
        for (i, b) in bytes.iter().enumerate() {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((v, at + i as u64 + 1));
            }
        }
        Err(invalid(at, "a varint runs past the end of its message"))
    }

    /// The field at `at` of a message ending at `end`.
    async fn field(&mut self, at: u64, end: u64) -> Result<Field> {
        let (tag, payload) = self.varint(at, end).await?;
        let (number, wire) = (tag >> 3, (tag & 7) as u8);
        if number == 0 {
            return Err(invalid(at, "field number 0"));
        }
        let (payload, field_end) = match wire {
            VARINT => {
                let (_, after) = self.varint(payload, end).await?;
                (payload, after)
            }
            FIXED64 => (payload, payload + 8),
            FIXED32 => (payload, payload + 4),
            LEN => {
                let (len, data) = self.varint(payload, end).await?;
                (data, data.checked_add(len).ok_or_else(|| invalid(at, "a length overflows"))?)
            }
            _ => return Err(invalid(at, &format!("field {number} has wire type {wire}, which ONNX does not use"))),
        };
        if field_end > end {
            return Err(invalid(
                at,
                &format!("field {number} ends at byte {field_end}, past the end of its message at {end}"),
            ));
        }
        Ok(Field { number, wire, start: at, payload, end: field_end })
    }

    /// Appends bytes `from..to` of the file to `out`, a window at a time.
    async fn copy(&mut self, from: u64, to: u64, out: &mut Vec<u8>) -> Result<()> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(self.window);
            out.extend_from_slice(self.bytes(at, n).await?);
            at += n;
        }
        Ok(())
    }
}

fn invalid(at: u64, what: &str) -> Error {
    Error::invalid_model(format!("not a valid ONNX model (protobuf decode failed at byte {at}: {what})"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_len_field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, (number << 3) | LEN as u64);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

// The tests build their models themselves: their unwraps and expects are assertions on those, not on user data.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::InMemoryResolver;
    use prost::Message;
    use tract_onnx::pb;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // the in-memory reads are ready at once
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    fn tensor(name: &str, n: usize, fill: u8) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: vec![n as i64],
            data_type: pb::tensor_proto::DataType::Uint8 as i32,
            raw_data: vec![fill; n],
            ..Default::default()
        }
    }

    fn model(inits: Vec<pb::TensorProto>) -> Vec<u8> {
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![pb::NodeProto {
                op_type: "Identity".into(),
                input: vec!["a".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: inits,
            ..Default::default()
        };
        pb::ModelProto { ir_version: 8, producer_name: "kiln test".into(), graph: Some(graph), ..Default::default() }
            .encode_to_vec()
    }

    fn run(bytes: &[u8], min: u64, window: u64) -> Result<Skeleton> {
        let source = InMemoryResolver::new().with_file("m.onnx", bytes.to_vec());
        block_on(skeleton(&source, "m.onnx", bytes.len() as u64, min, window))
    }

    #[test]
    fn large_raw_data_becomes_a_reference_to_its_bytes_in_the_file() {
        let small = tensor("small", 100, 7);
        let mut big = tensor("big", 5000, 0);
        big.raw_data.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 31 % 251) as u8);
        let float = pb::TensorProto {
            name: "floats".into(),
            dims: vec![2000],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: (0..2000).map(|i| i as f32).collect(),
            ..Default::default()
        };
        let bytes = model(vec![small.clone(), big.clone(), float.clone()]);
        for window in [64, 100, 4096, 1 << 20] {
            let sk = run(&bytes, 1024, window).expect("skeleton");
            assert_eq!((sk.moved, sk.moved_bytes), (1, 5000), "window {window}");
            assert!(sk.bytes.len() < bytes.len() - 4900, "{} of {}", sk.bytes.len(), bytes.len());
            let m = pb::ModelProto::decode(&*sk.bytes).expect("the skeleton decodes");
            let original = pb::ModelProto::decode(&*bytes).unwrap();
            assert_eq!(m.producer_name, original.producer_name);
            let g = m.graph.as_ref().unwrap();
            assert_eq!(g.node, original.graph.as_ref().unwrap().node);
            assert_eq!(g.initializer[0], small);
            assert_eq!(g.initializer[2], float, "float_data is not raw data: copied");
            let t = &g.initializer[1];
            assert_eq!((t.name.as_str(), &t.dims, t.data_type), ("big", &big.dims, big.data_type));
            assert!(t.raw_data.is_empty());
            assert_eq!(t.data_location, Some(pb::tensor_proto::DataLocation::External as i32));
            let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone()).unwrap();
            assert_eq!(get("location"), MODEL_ITSELF);
            let (offset, length): (usize, usize) = (get("offset").parse().unwrap(), get("length").parse().unwrap());
            assert_eq!(&bytes[offset..offset + length], &big.raw_data[..], "the reference points at the raw data");
        }
        // nothing at or over the threshold: the same bytes
        let sk = run(&bytes, 1 << 20, 4096).unwrap();
        assert_eq!((sk.moved, &sk.bytes), (0, &bytes));
    }

    /// Every truncation and corrupted bytes of a model: a skeleton or an error, never a panic (a panic in wasm kills
    /// the module), whatever the window.
    #[test]
    fn damaged_files_are_errors_not_panics() {
        let mut big = tensor("big", 3000, 0);
        big.raw_data.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        let bytes = model(vec![tensor("small", 40, 3), big, tensor("other", 2000, 9)]);
        for cut in 0..bytes.len() {
            let _ = run(&bytes[..cut], 1024, 64);
        }
        let mut state = 0x2545F4914F6CDD1Du64;
        for round in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // mostly the protobuf's headers (the first bytes and around the tensors), some anywhere
                let i = if round % 2 == 0 { (state as usize) % 64 } else { (state as usize) % b.len() };
                b[i] = (state >> 32) as u8;
            }
            if let Ok(sk) = run(&b, 1024, [64, 4096][round % 2]) {
                let _ = pb::ModelProto::decode(&*sk.bytes);
            }
        }
    }

    #[test]
    fn a_truncated_or_foreign_file_is_an_error_naming_the_byte() {
        let bytes = model(vec![tensor("big", 5000, 1)]);
        for cut in [bytes.len() - 1, bytes.len() / 2, 3] {
            let e = run(&bytes[..cut], 1024, 256).expect_err("truncated");
            assert!(e.message.contains("not a valid ONNX model") && e.message.contains("at byte"), "{e}");
        }
        let e = run(b"<!doctype html><html>not found</html>", 1024, 256).expect_err("html");
        assert!(e.message.contains("not a valid ONNX model"), "{e}");
        let e = run(&[], 1024, 256).expect_err("empty");
        assert!(e.message.contains("empty"), "{e}");
    }
}
