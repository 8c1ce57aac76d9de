//! Sweep expansion: `[sweep] grid` (cartesian product) and `zip` (paired lists) into points,
//! each with a short stable tag such as `lr=1e-3,moe=1`. Pure functions.

use std::collections::BTreeMap;

/// One point of a sweep: its tag and the values it sets, in key order.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub tag: String,
    pub values: Vec<(String, toml::Value)>,
}

/// Why a sweep cannot be expanded; the key it concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepError {
    /// `grid` or `zip`.
    pub section: &'static str,
    /// The dotted config key the axis varies.
    pub key: String,
    pub message: String,
}

/// Expands grid x zip. Grid keys are taken in sorted order with the last varying fastest; the
/// zip is one more axis (its lists advance together) placed after the grid.
pub fn expand(
    grid: &BTreeMap<String, Vec<serde_json::Value>>,
    zip: &BTreeMap<String, Vec<serde_json::Value>>,
) -> Result<Vec<Point>, SweepError> {
    let convert = |section: &'static str, key: &str, list: &[serde_json::Value]| {
        if list.is_empty() {
            return Err(SweepError {
                section,
                key: key.to_string(),
                message: "empty list: a sweep axis needs at least one value".into(),
            });
        }
        list.iter()
            .map(|v| {
                toml::Value::try_from(v).map_err(|e| SweepError {
                    section,
                    key: key.to_string(),
                    message: format!("value {v} is not usable: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    // Each axis: a list of alternatives, each alternative a list of (key, value).
    let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = Vec::new();
    for (key, list) in grid {
        let values = convert("grid", key, list)?;
        axes.push(values.into_iter().map(|v| vec![(key.clone(), v)]).collect());
    }
    if !zip.is_empty() {
        let len = zip.values().next().map_or(0, Vec::len);
        let mut columns = Vec::new();
        for (key, list) in zip {
            if list.len() != len {
                return Err(SweepError {
                    section: "zip",
                    key: key.clone(),
                    message: format!("has {} values but the other zip lists have {len}", list.len()),
                });
            }
            columns.push((key.clone(), convert("zip", key, list)?));
        }
        axes.push(
            (0..len).map(|i| columns.iter().map(|(k, vs)| (k.clone(), vs[i].clone())).collect()).collect(),
        );
    }
    if axes.is_empty() {
        return Ok(Vec::new());
    }
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for axis in &axes {
        let mut next = Vec::with_capacity(points.len() * axis.len());
        for p in &points {
            for alt in axis {
                let mut q = p.clone();
                q.extend(alt.iter().cloned());
                next.push(q);
            }
        }
        points = next;
    }
    Ok(points.into_iter().map(|values| Point { tag: tag(&values), values }).collect())
}

/// `lr=1e-3,moe=1`: short key names, compact values.
pub fn tag(values: &[(String, toml::Value)]) -> String {
    values.iter().map(|(k, v)| format!("{}={}", short_key(k), short_value(v))).collect::<Vec<_>>().join(",")
}

fn short_key(key: &str) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    let short = match last {
        "learning_rate" => "lr",
        "use_moe" => "moe",
        "batch_size" => "bs",
        "hidden_size" => "h",
        "num_hidden_layers" => "layers",
        "num_attention_heads" => "heads",
        "num_key_value_heads" => "kv",
        "intermediate_size" => "ffn",
        "accumulation_steps" => "accum",
        "weight_decay" => "wd",
        "max_seq_len" => "seq",
        "n_routed_experts" => "experts",
        "num_experts_per_tok" => "topk",
        "n_shared_experts" => "shared",
        "aux_loss_alpha" => "aux",
        "warmup_steps" => "warmup",
        other => other,
    };
    short.to_string()
}

fn short_value(v: &toml::Value) -> String {
    match v {
        toml::Value::Boolean(b) => u8::from(*b).to_string(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => short_float(*f),
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(short_value).collect::<Vec<_>>().join("_"),
        other => other.to_string(),
    }
}

/// The shorter of plain and scientific notation: 0.001 -> 1e-3, 0.5 -> 0.5, 3.0 -> 3.
pub fn short_float(f: f64) -> String {
    let plain = format!("{f}");
    let sci = format!("{f:e}");
    if sci.len() < plain.len() { sci } else { plain }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(items: &[(&str, serde_json::Value)]) -> BTreeMap<String, Vec<serde_json::Value>> {
        items.iter().map(|(k, v)| (k.to_string(), v.as_array().unwrap().clone())).collect()
    }

    #[test]
    fn grid_is_a_cartesian_product_in_sorted_key_order() {
        let grid =
            map(&[("train.learning_rate", json!([3e-4, 1e-3])), ("model.use_moe", json!([false, true]))]);
        let points = expand(&grid, &BTreeMap::new()).unwrap();
        let tags: Vec<&str> = points.iter().map(|p| p.tag.as_str()).collect();
        assert_eq!(tags, ["moe=0,lr=3e-4", "moe=0,lr=1e-3", "moe=1,lr=3e-4", "moe=1,lr=1e-3"]);
        assert_eq!(points[3].values[1], ("train.learning_rate".into(), toml::Value::Float(1e-3)));
    }

    #[test]
    fn zip_pairs_values_and_multiplies_the_grid() {
        let grid = map(&[("seed", json!([1, 2]))]);
        let zip =
            map(&[("model.hidden_size", json!([64, 128])), ("model.num_attention_heads", json!([4, 8]))]);
        let points = expand(&grid, &zip).unwrap();
        let tags: Vec<&str> = points.iter().map(|p| p.tag.as_str()).collect();
        assert_eq!(
            tags,
            ["seed=1,h=64,heads=4", "seed=1,h=128,heads=8", "seed=2,h=64,heads=4", "seed=2,h=128,heads=8"]
        );
    }

    #[test]
    fn bad_sweeps() {
        let empty = map(&[("train.learning_rate", json!([]))]);
        let e = expand(&empty, &BTreeMap::new()).unwrap_err();
        assert!(e.message.contains("empty"), "{e:?}");
        let zip = map(&[("seed", json!([1, 2])), ("train.batch_size", json!([4]))]);
        let e = expand(&BTreeMap::new(), &zip).unwrap_err();
        assert!(e.message.contains("has 1 values"), "{e:?}");
        assert!(expand(&BTreeMap::new(), &BTreeMap::new()).unwrap().is_empty());
    }

    #[test]
    fn float_formatting_table() {
        for (f, want) in
            [(1e-3, "1e-3"), (3e-4, "3e-4"), (0.5, "0.5"), (3.0, "3"), (0.02, "0.02"), (1e6, "1e6")]
        {
            assert_eq!(short_float(f), want);
        }
    }
}
