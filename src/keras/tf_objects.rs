//! The object graph TensorFlow stores beside a checkpoint's variables (`_CHECKPOINTABLE_OBJECT_GRAPH`,
//! a `TrackableObjectGraph`): which layer owns which variable. A Keras model's weighted layers are
//! the root's `layer_with_weights-N` children, in N order; a depth-first walk of each layer's
//! children, in their recorded order, visits its variables in Keras `weights` order (the order of
//! a legacy `.h5` file's `weight_names`, checked on every KerasCV model by the fixtures).

use super::reader::KerasLayer;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;

/// The object-graph tensor's name in the bundle.
pub const OBJECT_GRAPH_KEY: &str = "_CHECKPOINTABLE_OBJECT_GRAPH";

#[derive(Clone, PartialEq, prost::Message)]
struct TrackableObjectGraph {
    #[prost(message, repeated, tag = "1")]
    nodes: Vec<TrackableObject>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TrackableObject {
    #[prost(message, repeated, tag = "1")]
    children: Vec<ObjectReference>,
    #[prost(message, repeated, tag = "2")]
    attributes: Vec<SerializedTensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ObjectReference {
    #[prost(int32, tag = "1")]
    node_id: i32,
    #[prost(string, tag = "2")]
    local_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SerializedTensor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    full_name: String,
    #[prost(string, tag = "3")]
    checkpoint_key: String,
}

/// `layer_with_weights-N` children of a node, by N.
fn weighted_children(g: &TrackableObjectGraph, node: usize) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, usize, String)> = g.nodes[node]
        .children
        .iter()
        .filter_map(|c| {
            let n = c.local_name.strip_prefix("layer_with_weights-")?.parse().ok()?;
            Some((n, c.node_id as usize, c.local_name.clone()))
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, id, name)| (id, name)).collect()
}

fn variables(g: &TrackableObjectGraph, node: usize, seen: &mut BTreeSet<usize>, out: &mut Vec<String>) -> Result<()> {
    let n = g.nodes.get(node).with_context(|| format!("object graph: node {node} does not exist"))?;
    out.extend(n.attributes.iter().filter(|a| a.name == "VARIABLE_VALUE").map(|a| a.checkpoint_key.clone()));
    for c in &n.children {
        if seen.insert(c.node_id as usize) {
            variables(g, c.node_id as usize, seen, out)?;
        }
    }
    Ok(())
}

/// The Keras model in the graph: the root if it has weighted layers, else the one child (at any
/// depth, breadth first) that has them, e.g. `diffusion_model` of a trainer model.
fn model_node(g: &TrackableObjectGraph) -> Result<(usize, String)> {
    let mut frontier = vec![(0usize, String::new())];
    let mut seen = BTreeSet::from([0usize]);
    for _depth in 0..4 {
        let found: Vec<&(usize, String)> = frontier.iter().filter(|(n, _)| !weighted_children(g, *n).is_empty()).collect();
        match found.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            many => bail!(
                "holds several Keras models ({}); convert one saved on its own",
                many.iter().map(|(_, p)| if p.is_empty() { "the root".to_string() } else { format!("`{p}`") }).collect::<Vec<_>>().join(", ")
            ),
        }
        let mut next = Vec::new();
        for (node, path) in &frontier {
            for c in &g.nodes[*node].children {
                if seen.insert(c.node_id as usize) {
                    let p = if path.is_empty() { c.local_name.clone() } else { format!("{path}/{}", c.local_name) };
                    next.push((c.node_id as usize, p));
                }
            }
        }
        frontier = next;
    }
    bail!("the object graph holds no Keras layers with weights")
}

/// The weighted layers of the model in a serialized object graph, each with its variables'
/// checkpoint keys in Keras order.
pub fn weighted_layers(graph: &[u8]) -> Result<Vec<KerasLayer>> {
    let g = <TrackableObjectGraph as prost::Message>::decode(graph).context("object graph: not a TrackableObjectGraph")?;
    if g.nodes.is_empty() {
        bail!("object graph: empty");
    }
    let (model, _) = model_node(&g)?;
    weighted_children(&g, model)
        .into_iter()
        .map(|(node, name)| {
            let mut weights = Vec::new();
            variables(&g, node, &mut BTreeSet::from([node]), &mut weights)?;
            Ok(KerasLayer { name, weights })
        })
        .collect()
}
