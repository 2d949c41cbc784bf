//! Realistic defaults by GPU model: what a device's fields are when the scenario names the model
//! (`name = "NVIDIA A100-SXM4-80GB"`) and says nothing else: its PCI ids, memory, clocks, power
//! limits, PCIe link, BAR1 size, NVLink links, temperature thresholds, and what it cannot do (a
//! GeForce has no MIG and no ECC; an SXM board has no fan).
//!
//! A profile lists only the fields that differ from [`Device::default`](crate::scenario::Device),
//! which is an H100 SXM5 80GB; a name that matches no profile gets those H100 values. Profiles
//! are merged into the scenario before it is typed: a field the scenario states wins, and for
//! tables (`clocks`, `pcie`, `ecc`, ...) each key it states wins. `unsupported` is a list, so a
//! scenario that gives one replaces the model's whole list.

use serde_json::{Map, Value};

/// One model: a predicate on the lower-case name and its defaults as TOML.
struct Profile {
    matches: fn(&str) -> bool,
    toml: &'static str,
}

const A100_COMMON: &str = r#"
architecture = "ampere"
cuda_compute_capability = [8, 0]
memory_reserved = "512 MiB"
temperature_c = 32
idle_clocks = { graphics = 210, sm = 210, memory = 1593, video = 795 }
max_clocks = { graphics = 1410, sm = 1410, memory = 1593, video = 1290 }
pcie = { max_generation = 4, max_width = 16, generation = 4, width = 16 }
temperature_thresholds = { shutdown = 92, slowdown = 89, gpu_max = 85, mem_max = 95 }
vbios_version = "92.00.45.00.03"
"#;

const PROFILES: &[Profile] = &[
    Profile {
        matches: |n| n.contains("h100") && n.contains("pcie"),
        toml: r#"
pci_device_id = 0x233110DE
memory_bus_width = 5120
cuda_cores = 14592
pci_subsystem_id = 0x162610DE
power_usage_mw = 48000
power_limit_mw = 350000
power_limit_max_mw = 350000
idle_clocks = { graphics = 345, sm = 345, memory = 1593, video = 765 }
max_clocks = { graphics = 1755, sm = 1755, memory = 1593, video = 1545 }
nvlink = { links = 0, version = 0 }
unsupported = ["fan", "retired_pages", "nvlink"]
board_part_number = "900-21010-0000-000"
"#,
    },
    Profile {
        matches: |n| n.contains("h100"),
        toml: "",
    },
    Profile {
        matches: |n| n.contains("a100") && n.contains("80gb") && n.contains("pcie"),
        toml: r#"
pci_device_id = 0x20B510DE
memory_bus_width = 5120
cuda_cores = 6912
pci_subsystem_id = 0x153310DE
memory_total = "80 GiB"
power_usage_mw = 45000
power_limit_mw = 300000
power_limit_min_mw = 150000
power_limit_max_mw = 300000
bar1_total = "128 GiB"
nvlink = { links = 0, version = 0 }
unsupported = ["fan", "retired_pages", "nvlink"]
board_part_number = "900-21001-0020-100"
"#,
    },
    Profile {
        matches: |n| n.contains("a100") && n.contains("pcie"),
        toml: r#"
pci_device_id = 0x20F110DE
memory_bus_width = 5120
cuda_cores = 6912
pci_subsystem_id = 0x145F10DE
memory_total = "40 GiB"
power_usage_mw = 35000
power_limit_mw = 250000
power_limit_min_mw = 150000
power_limit_max_mw = 250000
bar1_total = "64 GiB"
nvlink = { links = 0, version = 0 }
unsupported = ["fan", "retired_pages", "nvlink"]
board_part_number = "900-21001-0000-000"
"#,
    },
    Profile {
        matches: |n| n.contains("a100") && n.contains("40gb"),
        toml: r#"
pci_device_id = 0x20B010DE
memory_bus_width = 5120
cuda_cores = 6912
pci_subsystem_id = 0x134F10DE
memory_total = "40 GiB"
power_usage_mw = 55000
power_limit_mw = 400000
power_limit_min_mw = 100000
power_limit_max_mw = 400000
bar1_total = "64 GiB"
nvlink = { links = 12, version = 3 }
board_part_number = "692-2G506-0200-002"
"#,
    },
    Profile {
        matches: |n| n.contains("a100"),
        toml: r#"
pci_device_id = 0x20B210DE
memory_bus_width = 5120
cuda_cores = 6912
pci_subsystem_id = 0x147F10DE
memory_total = "80 GiB"
power_usage_mw = 62000
power_limit_mw = 400000
power_limit_min_mw = 100000
power_limit_max_mw = 400000
bar1_total = "128 GiB"
nvlink = { links = 12, version = 3 }
board_part_number = "692-2G506-0210-002"
"#,
    },
    Profile {
        matches: |n| n.contains("rtx 4090"),
        toml: r#"
pci_device_id = 0x268410DE
memory_bus_width = 384
cuda_cores = 16384
pci_subsystem_id = 0x167C10DE
brand = "geforce"
architecture = "ada"
cuda_compute_capability = [8, 9]
memory_total = 25757220864
memory_reserved = "300 MiB"
temperature_c = 38
power_usage_mw = 19000
power_limit_mw = 450000
power_limit_min_mw = 150000
power_limit_max_mw = 600000
fan_speed = 30
num_fans = 2
idle_clocks = { graphics = 210, sm = 210, memory = 405, video = 1185 }
max_clocks = { graphics = 3120, sm = 3120, memory = 10501, video = 2415 }
idle_pstate = 8
persistence_mode = false
ecc = { enabled = false }
max_mig_devices = 0
pcie = { max_generation = 4, max_width = 16, generation = 1, width = 16 }
bar1_total = "256 MiB"
temperature_thresholds = { shutdown = 92, slowdown = 89, gpu_max = 90 }
nvlink = { links = 0, version = 0 }
unsupported = ["ecc", "mig", "nvlink", "retired_pages", "remapped_rows"]
vbios_version = "95.02.18.80.5F"
board_part_number = ""
"#,
    },
    Profile {
        matches: |n| n.contains("rtx 3090"),
        toml: r#"
pci_device_id = 0x220410DE
memory_bus_width = 384
cuda_cores = 10496
pci_subsystem_id = 0x147D10DE
brand = "geforce"
architecture = "ampere"
cuda_compute_capability = [8, 6]
memory_total = "24 GiB"
memory_reserved = "250 MiB"
temperature_c = 36
power_usage_mw = 22000
power_limit_mw = 350000
power_limit_min_mw = 100000
power_limit_max_mw = 400000
fan_speed = 30
num_fans = 2
idle_clocks = { graphics = 210, sm = 210, memory = 405, video = 555 }
max_clocks = { graphics = 2100, sm = 2100, memory = 9751, video = 1950 }
idle_pstate = 8
persistence_mode = false
ecc = { enabled = false }
max_mig_devices = 0
pcie = { max_generation = 4, max_width = 16, generation = 1, width = 16 }
bar1_total = "256 MiB"
temperature_thresholds = { shutdown = 98, slowdown = 95, gpu_max = 93 }
nvlink = { links = 4, version = 3 }
unsupported = ["ecc", "mig", "retired_pages", "remapped_rows"]
vbios_version = "94.02.42.00.A9"
board_part_number = ""
"#,
    },
    Profile {
        matches: |n| {
            n.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == "t4")
        },
        toml: r#"
pci_device_id = 0x1EB810DE
memory_bus_width = 256
cuda_cores = 2560
pci_subsystem_id = 0x12A210DE
brand = "tesla"
architecture = "turing"
cuda_compute_capability = [7, 5]
memory_total = "15 GiB"
memory_reserved = "250 MiB"
temperature_c = 36
power_usage_mw = 10000
power_limit_mw = 70000
power_limit_min_mw = 60000
power_limit_max_mw = 70000
idle_clocks = { graphics = 300, sm = 300, memory = 405, video = 540 }
max_clocks = { graphics = 1590, sm = 1590, memory = 5001, video = 1470 }
idle_pstate = 8
max_mig_devices = 0
pcie = { max_generation = 3, max_width = 16, generation = 3, width = 16 }
bar1_total = "256 MiB"
temperature_thresholds = { shutdown = 96, slowdown = 93, gpu_max = 85 }
nvlink = { links = 0, version = 0 }
unsupported = ["fan", "mig", "nvlink", "remapped_rows"]
vbios_version = "90.04.96.00.02"
board_part_number = "900-2G183-0000-001"
"#,
    },
    Profile {
        matches: |n| n.contains("v100"),
        toml: r#"
pci_device_id = 0x1DB510DE
memory_bus_width = 4096
cuda_cores = 5120
pci_subsystem_id = 0x124910DE
brand = "tesla"
architecture = "volta"
cuda_compute_capability = [7, 0]
memory_total = "32 GiB"
memory_reserved = "250 MiB"
temperature_c = 35
power_usage_mw = 42000
power_limit_mw = 300000
power_limit_min_mw = 150000
power_limit_max_mw = 300000
idle_clocks = { graphics = 135, sm = 135, memory = 877, video = 555 }
max_clocks = { graphics = 1530, sm = 1530, memory = 877, video = 1372 }
max_mig_devices = 0
pcie = { max_generation = 3, max_width = 16, generation = 3, width = 16 }
bar1_total = "32 GiB"
temperature_thresholds = { shutdown = 90, slowdown = 87, gpu_max = 83, mem_max = 85 }
nvlink = { links = 6, version = 2 }
unsupported = ["fan", "mig", "remapped_rows"]
vbios_version = "88.00.80.00.01"
board_part_number = "900-2G503-0430-000"
"#,
    },
];

/// The defaults for a GPU named `name`, as a JSON object (empty: the H100 SXM defaults).
pub fn defaults_for(name: &str) -> Map<String, Value> {
    let lower = name.to_ascii_lowercase();
    let Some(p) = PROFILES.iter().find(|p| (p.matches)(&lower)) else {
        return Map::new();
    };
    let mut text = String::new();
    if lower.contains("a100") {
        text.push_str(A100_COMMON);
    }
    let mut out = table(&text);
    for (k, v) in table(p.toml) {
        merge_key(&mut out, k, v, true);
    }
    out
}

fn table(text: &str) -> Map<String, Value> {
    // The profiles are constants checked by a unit test, so they always parse.
    let t: toml::Table = toml::from_str(text).unwrap_or_default();
    match serde_json::to_value(t) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Puts `value` at `key` in `into`: when both are tables, key by key; `overwrite` says who wins.
fn merge_key(into: &mut Map<String, Value>, key: String, value: Value, overwrite: bool) {
    match (into.get_mut(&key), value) {
        (Some(Value::Object(have)), Value::Object(add)) => {
            for (k, v) in add {
                if overwrite || !have.contains_key(&k) {
                    have.insert(k, v);
                }
            }
        }
        (Some(_), v) if overwrite => {
            into.insert(key, v);
        }
        (Some(_), _) => {}
        (None, v) => {
            into.insert(key, v);
        }
    }
}

/// Fills each device of a scenario document (`{"devices": [...]}`) with its model's defaults
/// where it is silent. Entries that are not tables are left for the typed parse to reject.
pub fn apply(doc: &mut Value) {
    let Some(Value::Array(devices)) = doc.get_mut("devices") else {
        return;
    };
    for d in devices {
        let Value::Object(obj) = d else { continue };
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for (k, v) in defaults_for(&name) {
            merge_key(obj, k, v, false);
        }
        // A stated `clocks` table takes the keys it leaves out from the maximum clocks (the
        // model's, unless stated too).
        if matches!(obj.get("clocks"), Some(Value::Object(_))) {
            let max = obj.get("max_clocks").cloned().unwrap_or_else(|| {
                // The built-in (H100) maximum clocks of `Device::default`.
                serde_json::json!({ "graphics": 1980, "sm": 1980, "memory": 2619, "video": 1545 })
            });
            merge_key(obj, "clocks".into(), max, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_names_known_fields() {
        for p in PROFILES {
            let t: toml::Table = toml::from_str(p.toml).expect(p.toml);
            let doc = serde_json::json!({ "devices": [t] }).to_string();
            crate::Scenario::parse(&doc, crate::scenario::Format::Json, "profile")
                .unwrap_or_else(|e| panic!("{e}\n{doc}"));
        }
        let _: toml::Table = toml::from_str(A100_COMMON).unwrap();
    }

    #[test]
    fn names_pick_their_profile() {
        let id = |n: &str| defaults_for(n).get("pci_device_id").and_then(Value::as_u64);
        assert_eq!(id("NVIDIA H100 80GB HBM3"), None, "the built-in defaults");
        assert_eq!(id("NVIDIA H100 PCIe"), Some(0x2331_10DE));
        assert_eq!(id("NVIDIA A100-SXM4-80GB"), Some(0x20B2_10DE));
        assert_eq!(id("NVIDIA A100-SXM4-40GB"), Some(0x20B0_10DE));
        assert_eq!(id("NVIDIA A100-PCIE-40GB"), Some(0x20F1_10DE));
        assert_eq!(id("NVIDIA A100 80GB PCIe"), Some(0x20B5_10DE));
        assert_eq!(id("NVIDIA GeForce RTX 4090"), Some(0x2684_10DE));
        assert_eq!(id("Tesla T4"), Some(0x1EB8_10DE));
        assert_eq!(id("Tesla V100-SXM2-32GB"), Some(0x1DB5_10DE));
        assert_eq!(id("Some Future GPU"), None);
        // The A100 profiles share their family's clocks.
        let d = defaults_for("NVIDIA A100-PCIE-40GB");
        assert_eq!(d["max_clocks"]["graphics"], 1410);
    }

    #[test]
    fn stated_fields_win_key_by_key() {
        let mut doc: Value = serde_json::json!({"devices": [
            {"name": "NVIDIA A100-SXM4-80GB", "power_limit_mw": 300000, "clocks": {"graphics": 1000}},
            {"clocks": {"sm": 900}},
            "not a table"
        ]});
        apply(&mut doc);
        let d = &doc["devices"][0];
        assert_eq!(d["power_limit_mw"], 300000);
        assert_eq!(d["clocks"]["graphics"], 1000);
        assert_eq!(
            d["clocks"]["memory"], 1593,
            "the model's maximum memory clock"
        );
        assert_eq!(d["idle_clocks"]["graphics"], 210);
        assert_eq!(d["bar1_total"], "128 GiB");
        assert_eq!(
            doc["devices"][1]["clocks"]["graphics"], 1980,
            "the H100's maximum"
        );
        assert_eq!(doc["devices"][1]["clocks"]["sm"], 900);
        assert_eq!(doc["devices"][2], "not a table");
    }
}
