//! kiln-js: kiln for JavaScript, shaped like onnxruntime-web.
//!
//! ```js
//! import init, { InferenceSession, Tensor, version } from "./kiln_js.js";
//! await init();
//! const session = await InferenceSession.create(new Uint8Array(await (await fetch("model.onnx")).arrayBuffer()));
//! const feeds = { input_ids: new Tensor("int64", new BigInt64Array([1n, 2n, 3n]), [1, 3]) };
//! const results = await session.run(feeds);
//! console.log(results.logits.dims, results.logits.data);
//! ```
//!
//! The pure-Rust half ([`load_check`], [`tensor_from_bytes`], ...) is what the wasm-bindgen exports call; it is
//! tested natively. The exports themselves only exist on wasm32.

use kiln_provider::{ElementType, SessionOptions, Tensor as KilnTensor};

/// kiln's version (the crate version).
pub fn kiln_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Loads a model from ONNX bytes and describes it: `inputs: name type shape; ...` or the load error.
pub fn load_check(bytes: &[u8]) -> Result<String, String> {
    let session = pollster::block_on(kiln_provider::Session::from_bytes(bytes, &SessionOptions::default()))
        .map_err(|e| e.to_string())?;
    let describe = |vs: &[kiln_provider::ValueInfo]| {
        vs.iter()
            .map(|v| format!("{} {} {}", v.name, v.element_type.map(|t| t.name()).unwrap_or("?"), v.shape_string()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Ok(format!("inputs: {}\noutputs: {}", describe(session.inputs()), describe(session.outputs())))
}

/// A tensor from onnxruntime-web's type name, dims and the little-endian bytes of its data.
pub fn tensor_from_bytes(type_name: &str, dims: &[usize], bytes: &[u8]) -> Result<KilnTensor, String> {
    let et = element_type(type_name)?;
    KilnTensor::from_bytes(et, dims, bytes).map_err(|e| e.to_string())
}

fn element_type(type_name: &str) -> Result<ElementType, String> {
    ElementType::from_name(type_name).ok_or_else(|| {
        format!(
            "unsupported tensor type `{type_name}` (supported: {})",
            ElementType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        )
    })
}

#[cfg(target_arch = "wasm32")]
mod web {
    use std::rc::Rc;

    use js_sys::{Array, Object, Reflect, Uint8Array};
    use kiln_provider::{ElementType, ExecutionProvider, Session, SessionOptions, Tensor as KilnTensor};
    use wasm_bindgen::prelude::*;
    use wasm_bindgen::JsCast;

    fn err(e: impl std::fmt::Display) -> JsError {
        JsError::new(&e.to_string())
    }

    /// kiln's version.
    #[wasm_bindgen]
    pub fn version() -> String {
        super::kiln_version().to_string()
    }

    /// Loads a model and returns its inputs and outputs as text, or throws the load error.
    #[wasm_bindgen(js_name = loadCheck)]
    pub fn load_check(bytes: &[u8]) -> Result<String, JsError> {
        super::load_check(bytes).map_err(err)
    }

    /// onnxruntime-web's `Tensor`: `new Tensor(type, data, dims)`.
    #[wasm_bindgen]
    pub struct Tensor {
        inner: KilnTensor,
    }

    fn bytes_of(data: &JsValue) -> Result<Vec<u8>, JsError> {
        // any TypedArray / DataView: view its bytes
        if let Some(view) = data.dyn_ref::<js_sys::Object>() {
            let buffer = Reflect::get(view, &"buffer".into()).map_err(|_| err("data has no buffer"))?;
            if let Some(buffer) = buffer.dyn_ref::<js_sys::ArrayBuffer>() {
                let offset = Reflect::get(view, &"byteOffset".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
                let length = Reflect::get(view, &"byteLength".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
                return Ok(Uint8Array::new_with_byte_offset_and_length(buffer, offset as u32, length as u32).to_vec());
            }
        }
        Err(err("tensor data must be a typed array (Float32Array, BigInt64Array, Int32Array, Uint8Array, ...)"))
    }

    #[wasm_bindgen]
    impl Tensor {
        #[wasm_bindgen(constructor)]
        pub fn new(type_name: &str, data: JsValue, dims: Vec<u32>) -> Result<Tensor, JsError> {
            let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
            let bytes = bytes_of(&data)?;
            Ok(Tensor { inner: super::tensor_from_bytes(type_name, &dims, &bytes).map_err(err)? })
        }

        #[wasm_bindgen(getter, js_name = type)]
        pub fn type_name(&self) -> String {
            self.inner.element_type().name().to_string()
        }

        #[wasm_bindgen(getter)]
        pub fn dims(&self) -> Vec<u32> {
            self.inner.dims().iter().map(|d| *d as u32).collect()
        }

        #[wasm_bindgen(getter)]
        pub fn size(&self) -> u32 {
            self.inner.len() as u32
        }

        /// The data as the typed array onnxruntime-web uses for the type (float16: Uint16Array).
        #[wasm_bindgen(getter)]
        pub fn data(&self) -> Result<JsValue, JsError> {
            let bytes = self.inner.as_bytes().map_err(err)?;
            let u8s = Uint8Array::from(bytes);
            let buf = u8s.buffer();
            Ok(match self.inner.element_type() {
                ElementType::F32 => js_sys::Float32Array::new(&buf).into(),
                ElementType::F64 => js_sys::Float64Array::new(&buf).into(),
                ElementType::F16 | ElementType::U16 => js_sys::Uint16Array::new(&buf).into(),
                ElementType::I64 => js_sys::BigInt64Array::new(&buf).into(),
                ElementType::U64 => js_sys::BigUint64Array::new(&buf).into(),
                ElementType::I32 => js_sys::Int32Array::new(&buf).into(),
                ElementType::U32 => js_sys::Uint32Array::new(&buf).into(),
                ElementType::I16 => js_sys::Int16Array::new(&buf).into(),
                ElementType::I8 => js_sys::Int8Array::new(&buf).into(),
                ElementType::U8 | ElementType::Bool => u8s.into(),
                ElementType::String => return Err(err("string tensors are not supported in kiln-js yet")),
            })
        }
    }

    /// onnxruntime-web's `InferenceSession`.
    #[wasm_bindgen]
    pub struct InferenceSession {
        inner: Rc<Session>,
    }

    #[wasm_bindgen]
    impl InferenceSession {
        /// `InferenceSession.create(bytes, { executionProviders: ['webgpu', 'wasm'] })`.
        pub async fn create(bytes: Uint8Array, options: JsValue) -> Result<InferenceSession, JsError> {
            let mut opts = SessionOptions::default();
            if options.is_object() {
                if let Ok(eps) = Reflect::get(&options, &"executionProviders".into()) {
                    if let Some(eps) = eps.dyn_ref::<Array>() {
                        for ep in eps.iter() {
                            let name = ep
                                .as_string()
                                .or_else(|| Reflect::get(&ep, &"name".into()).ok().and_then(|n| n.as_string()))
                                .ok_or_else(|| err("executionProviders holds strings or { name }"))?;
                            opts.execution_providers.push(ExecutionProvider::from_name(&name).map_err(err)?);
                        }
                    }
                }
            }
            let session = Session::from_bytes(&bytes.to_vec(), &opts).await.map_err(err)?;
            Ok(InferenceSession { inner: Rc::new(session) })
        }

        #[wasm_bindgen(getter, js_name = inputNames)]
        pub fn input_names(&self) -> Vec<String> {
            self.inner.input_names().into_iter().map(String::from).collect()
        }

        #[wasm_bindgen(getter, js_name = outputNames)]
        pub fn output_names(&self) -> Vec<String> {
            self.inner.output_names().into_iter().map(String::from).collect()
        }

        /// `session.run({ name: Tensor, ... })` → a Promise of `{ name: Tensor, ... }`.
        pub fn run(&self, feeds: Object) -> js_sys::Promise {
            let session = self.inner.clone();
            wasm_bindgen_futures::future_to_promise(async move {
                let mut inputs = vec![];
                for entry in Object::entries(&feeds).iter() {
                    let pair: Array = entry.unchecked_into();
                    let name = pair.get(0).as_string().unwrap_or_default();
                    let value = pair.get(1);
                    let t = tensor_of(&value).map_err(JsValue::from)?;
                    inputs.push((name, t));
                }
                let outputs = session.run(inputs).await.map_err(|e| JsValue::from(err(e)))?;
                let result = Object::new();
                for (name, t) in outputs.into_vec() {
                    Reflect::set(&result, &name.into(), &Tensor { inner: t }.into())?;
                }
                Ok(result.into())
            })
        }
    }

    /// A feed: a kiln `Tensor`, or anything shaped like onnxruntime-web's (`{ type, data, dims }`).
    fn tensor_of(value: &JsValue) -> Result<KilnTensor, JsError> {
        let get = |k: &str| Reflect::get(value, &k.into()).map_err(|_| err(format!("feed has no `{k}`")));
        let type_name = get("type")?.as_string().ok_or_else(|| err("feed `type` must be a string"))?;
        let dims: Vec<usize> = Array::from(&get("dims")?).iter().map(|d| d.as_f64().unwrap_or(0.0) as usize).collect();
        let bytes = bytes_of(&get("data")?)?;
        super::tensor_from_bytes(&type_name, &dims, &bytes).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_the_crate_version() {
        assert_eq!(kiln_version(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn load_check_describes_a_model() {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx");
        let bytes = std::fs::read(path).unwrap();
        let text = load_check(&bytes).unwrap();
        assert!(text.contains("input_ids int64 [batch_size, sequence_length]"), "{text}");
        assert!(text.contains("logits float32"), "{text}");
        assert!(load_check(b"garbage").is_err());
    }

    #[test]
    fn tensors_from_bytes() {
        let t = tensor_from_bytes("float32", &[2], &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(tensor_from_bytes("complex64", &[1], &[0; 8]).is_err());
        assert!(tensor_from_bytes("float32", &[3], &[0; 8]).is_err());
    }
}
