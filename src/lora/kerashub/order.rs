//! The order KerasHub numbers a backbone's layers in (`lora/<i>` of a `.lora.h5`): Keras'
//! `_flatten_layers`, rebuilt from keras-hub's SD3 class structure.

use crate::convert::plan::Plan;

/// The structure that decides the flattened order.
#[derive(Clone, Debug, PartialEq)]
pub struct Structure {
    pub clip_l_layers: usize,
    pub clip_g_layers: usize,
    pub blocks: usize,
    pub qk_norm: bool,
    pub dual: Vec<usize>,
}

/// One weighted layer in flattened order: keras-hub's layer path and, for a layer whose kernel
/// LoRA can adapt, the kernel's dataset in a backbone's `.weights.h5`.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayer {
    pub path: String,
    pub kernel: Option<String>,
}

/// A layer node: keras-hub name, Keras 3 file key, whether its kernel can carry LoRA, children
/// in creation order.
struct Node {
    name: String,
    key: String,
    kernel: bool,
    children: Vec<Node>,
}

fn leaf(name: &str, key: &str, kernel: bool) -> Node {
    Node { name: name.into(), key: key.into(), kernel, children: Vec::new() }
}

fn node(name: &str, key: &str, children: Vec<Node>) -> Node {
    Node { name: name.into(), key: key.into(), kernel: false, children }
}

fn numbered(key: &str, i: usize) -> String {
    if i == 0 {
        key.to_string()
    } else {
        format!("{key}_{i}")
    }
}

fn clip(prefix: &str, layers: usize) -> Node {
    let block = |i: usize| {
        node(
            &format!("{prefix}_encoder_block_{i}"),
            &numbered("clip_encoder_layer", i),
            vec![
                leaf("layer_norm_1", "layer_norm_1", false),
                node(
                    "attention",
                    "attention",
                    vec![leaf("query", "query_dense", true), leaf("key", "key_dense", true), leaf("value", "value_dense", true), leaf("attention_output", "output_dense", true)],
                ),
                leaf("layer_norm_2", "layer_norm_2", false),
                leaf("dense_1", "dense_1", true),
                leaf("dense_2", "dense_2", true),
            ],
        )
    };
    let mut children = vec![node(
        &format!("{prefix}_embedding"),
        "token_and_position_embedding",
        vec![leaf("token_embedding", "token_embedding", false), leaf("position_embedding", "position_embedding", false)],
    )];
    children.extend((0..layers).map(block));
    children.push(leaf(&format!("{prefix}_layer_norm"), "layer_normalization", false));
    node(prefix, "", children)
}

fn mlp(name: &str, key: &str) -> Node {
    node(name, key, vec![leaf("dense1", "dense1", true), leaf("dense2", "dense2", true)])
}

fn mmdit(s: &Structure) -> Node {
    let norms = |suffix: &str| -> Vec<Node> {
        if s.qk_norm {
            vec![leaf(&format!("q_norm{suffix}"), &format!("q_norm{suffix}"), false), leaf(&format!("k_norm{suffix}"), &format!("k_norm{suffix}"), false)]
        } else {
            Vec::new()
        }
    };
    let ada = || node("ada_layer_norm", "ada_layer_norm", vec![leaf("dense", "dense", true)]);
    let block = |i: usize| {
        let mut x = vec![ada(), leaf("attention_qkv", "attention_qkv", true)];
        x.extend(norms(""));
        x.extend([leaf("attention_proj", "attention_proj", true), mlp("mlp", "mlp")]);
        if s.dual.contains(&i) {
            x.push(leaf("attention_qkv2", "attention_qkv2", true));
            x.extend(norms("2"));
            x.push(leaf("attention_proj2", "attention_proj2", true));
        }
        let mut c = vec![ada(), leaf("attention_qkv", "attention_qkv", true)];
        c.extend(norms(""));
        if i + 1 < s.blocks {
            c.extend([leaf("attention_proj", "attention_proj", true), mlp("mlp", "mlp")]);
        }
        node(&format!("joint_block_{i}"), &numbered("mm_di_t_block", i), vec![node("x_block", "x_block", x), node("context_block", "context_block", c)])
    };
    let mut children = vec![
        node("patch_embedding", "patch_embedding", vec![leaf("patch_embedding", "patch_embedding", true)]),
        leaf("position_embedding", "adjustable_position_embedding", false),
        leaf("context_embedding", "dense", true),
        mlp("vector_embedding", "mlp"),
        node("timestep_embedding", "timestep_embedding", vec![mlp("mlp", "mlp")]),
    ];
    children.extend((0..s.blocks).map(block));
    children.push(node("output_ada_layer_norm", "adaptive_layer_normalization", vec![leaf("dense", "dense", true)]));
    children.push(leaf("output_dense", "dense_1", true));
    node("diffuser", "", children)
}

/// keras-hub's weighted layers of an SD3 backbone (without T5) up to the VAE, in
/// `_flatten_layers` order (the VAE comes last and is not listed: LoRA on it is refused).
pub fn flattened_layers(s: &Structure) -> Vec<FlatLayer> {
    let top = [
        (clip("clip_l", s.clip_l_layers), "layers/clip_text_encoder/layers/"),
        (node("clip_l_projection", "", vec![leaf("dense", "dense", true)]), "layers/clip_projection/"),
        (clip("clip_g", s.clip_g_layers), "layers/clip_text_encoder_1/layers/"),
        (node("clip_g_projection", "", vec![leaf("dense", "dense", true)]), "layers/clip_projection_1/"),
        (mmdit(s), "layers/mm_di_t/layers/"),
    ];
    let mut out = Vec::new();
    // Depth first; sub-layers in reverse creation order (Keras pushes them to the front of its
    // queue one by one).
    fn visit(n: &Node, path: &str, file: &str, out: &mut Vec<FlatLayer>) {
        out.push(FlatLayer { path: path.to_string(), kernel: n.kernel.then(|| format!("{file}/vars/0")) });
        for c in n.children.iter().rev() {
            let file = if file.ends_with('/') { format!("{file}{}", c.key) } else { format!("{file}/{}", c.key) };
            visit(c, &format!("{path}/{}", c.name), &file, out);
        }
    }
    for (n, root) in &top {
        out.push(FlatLayer { path: n.name.clone(), kernel: None });
        for c in n.children.iter().rev() {
            visit(c, &format!("{}/{}", n.name, c.name), &format!("{root}{}", c.key), &mut out);
        }
    }
    out
}

/// The flattened order's structure from the matched parts of a model.
pub fn structure(mmdit: &Plan, clip_l: &Plan, clip_g: &Plan) -> Structure {
    Structure {
        clip_l_layers: clip_l.symbols.get("n").copied().unwrap_or(0),
        clip_g_layers: clip_g.symbols.get("n").copied().unwrap_or(0),
        blocks: mmdit.symbols.get("n").map_or(0, |n| n + 1),
        qk_norm: mmdit.features.contains_key("qk_norm"),
        dual: crate::diffusers::sd3::dual_attention_layers(mmdit),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// keras-hub's own `_flatten_layers` list of tiny backbones of each variant (written by
    /// fixtures/make_kerashub_lora_order.py): the same names in the same order, and a LoRA kernel
    /// exactly where keras-hub's layer has one.
    #[test]
    fn the_order_is_keras_hubs() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kerashub/lora_order.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (variant, v) in fixture.as_object().unwrap() {
            let s = &v["structure"];
            let structure = Structure {
                clip_l_layers: s["clip_l_layers"].as_u64().unwrap() as usize,
                clip_g_layers: s["clip_g_layers"].as_u64().unwrap() as usize,
                blocks: s["blocks"].as_u64().unwrap() as usize,
                qk_norm: s["qk_norm"].as_bool().unwrap(),
                dual: s["dual"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            };
            let ours: Vec<String> = flattened_layers(&structure)
                .iter()
                .map(|l| format!("{}{}", l.path.rsplit('/').next().unwrap(), if l.kernel.is_some() { " lora" } else { "" }))
                .collect();
            let theirs: Vec<String> = v["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
            assert_eq!(ours.len(), theirs.len(), "{variant}: layer count");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a, b, "{variant}: layer {i}");
            }
        }
    }
}
