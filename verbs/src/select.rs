//! Choosing a backend, and the device nearest to a PCI device (a GPU).

use std::path::{Path, PathBuf};

use crate::api::*;
use crate::ibv::IbvProvider;

/// What the operator asked for: config `fabric.provider`, overridden by the
/// FERRY_FABRIC environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// `ibv` when a usable device exists, else `soft`.
    Auto,
    Ibv,
    Soft,
}

impl std::str::FromStr for Preference {
    type Err = VerbsError;
    fn from_str(s: &str) -> Result<Preference> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Preference::Auto),
            "ibv" | "rdma" => Ok(Preference::Ibv),
            "soft" | "tcp" => Ok(Preference::Soft),
            other => Err(VerbsError::InvalidArgument(format!(
                "fabric provider {other:?}: expected auto, ibv or soft"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Ibv { device: String },
    Soft,
}

/// The backend chosen, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub choice: Choice,
    pub reason: String,
}

/// The environment variable that overrides the configured preference.
pub const ENV: &str = "FERRY_FABRIC";

/// The preference in force: FERRY_FABRIC when set, else `configured`.
pub fn preference(configured: Preference) -> Result<(Preference, &'static str)> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => Ok((v.parse()?, "FERRY_FABRIC")),
        _ => Ok((configured, "the configuration")),
    }
}

/// A device is usable when one of its ports is active.
fn usable(devs: &[DeviceInfo]) -> Option<&DeviceInfo> {
    devs.iter().find(|d| d.ports.iter().any(|p| p.active))
}

/// Chooses among the `ibv` devices `devs` (as `IbvProvider::devices`
/// lists them) according to `pref`. An explicit `ibv` without a usable
/// device is an error, not a silent fall-back.
pub fn choose(pref: Preference, source: &str, devs: &[DeviceInfo]) -> Result<Selection> {
    match pref {
        Preference::Soft => Ok(Selection {
            choice: Choice::Soft,
            reason: format!("soft requested by {source}"),
        }),
        Preference::Ibv => match usable(devs) {
            Some(d) => Ok(Selection {
                choice: Choice::Ibv {
                    device: d.name.clone(),
                },
                reason: format!("ibv requested by {source}; {} has an active port", d.name),
            }),
            None => Err(VerbsError::NoDevice(format!(
                "ibv requested by {source}, but no RDMA device has an active port ({} found)",
                devs.len()
            ))),
        },
        Preference::Auto => match usable(devs) {
            Some(d) => Ok(Selection {
                choice: Choice::Ibv {
                    device: d.name.clone(),
                },
                reason: format!("{} has an active port", d.name),
            }),
            None if devs.is_empty() => Ok(Selection {
                choice: Choice::Soft,
                reason: "no RDMA device on this host".into(),
            }),
            None => Ok(Selection {
                choice: Choice::Soft,
                reason: format!("no active port on {} RDMA device(s)", devs.len()),
            }),
        },
    }
}

/// Discovers `ibv` devices and chooses (the whole decision, for ferryd).
pub fn select(configured: Preference) -> Result<Selection> {
    let (pref, source) = preference(configured)?;
    let devs = if pref == Preference::Soft {
        Vec::new()
    } else {
        IbvProvider.devices()?
    };
    choose(pref, source, &devs)
}

/// The sysfs path of a PCI device (its position in the PCIe tree), e.g.
/// /sys/devices/pci0000:16/0000:16:02.0/0000:17:00.0.
pub fn pci_path(sysfs: &Path, address: &str) -> Option<PathBuf> {
    std::fs::canonicalize(sysfs.join("bus/pci/devices").join(address)).ok()
}

/// How many PCIe tree levels two device paths share (more is nearer: the
/// same switch beats the same root complex).
pub fn shared_depth(a: &Path, b: &Path) -> usize {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .count()
}

/// The device of `devs` nearest to the PCI device `address` (a GPU's):
/// deepest shared PCIe path, then same NUMA node, then the first. `sysfs`
/// is normally "/sys".
pub fn nearest<'a>(devs: &'a [DeviceInfo], address: &str, sysfs: &Path) -> Option<&'a DeviceInfo> {
    let target = pci_path(sysfs, address);
    let target_numa: Option<i32> = std::fs::read_to_string(
        sysfs
            .join("bus/pci/devices")
            .join(address)
            .join("numa_node"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .filter(|n: &i32| *n >= 0);
    devs.iter().max_by_key(|d| {
        let depth = match (
            &target,
            d.pci_address.as_deref().and_then(|p| pci_path(sysfs, p)),
        ) {
            (Some(t), Some(p)) => shared_depth(t, &p),
            _ => 0,
        };
        let same_numa = target_numa.is_some() && d.numa_node == target_numa;
        // max_by_key keeps the last maximum; prefer earlier devices on ties.
        (
            depth,
            same_numa,
            std::cmp::Reverse(devs.iter().position(|x| x.name == d.name)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, active: bool, pci: Option<&str>, numa: Option<i32>) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            backend: "ibv".into(),
            ports: vec![PortInfo {
                port: 1,
                active,
                link_layer: LinkLayer::Ethernet,
                active_mtu: 1024,
                gids: vec![],
            }],
            pci_address: pci.map(String::from),
            numa_node: numa,
        }
    }

    #[test]
    fn preferences_parse_with_clear_errors() {
        assert_eq!("auto".parse::<Preference>().unwrap(), Preference::Auto);
        assert_eq!("IBV".parse::<Preference>().unwrap(), Preference::Ibv);
        assert_eq!("soft".parse::<Preference>().unwrap(), Preference::Soft);
        let e = "infiniband".parse::<Preference>().unwrap_err().to_string();
        assert!(e.contains("auto, ibv or soft"), "{e}");
    }

    #[test]
    fn auto_picks_ibv_only_with_an_active_port() {
        let none: Vec<DeviceInfo> = vec![];
        let s = choose(Preference::Auto, "test", &none).unwrap();
        assert_eq!(s.choice, Choice::Soft);
        assert!(s.reason.contains("no RDMA device"));
        let down = vec![dev("mlx5_0", false, None, None)];
        let s = choose(Preference::Auto, "test", &down).unwrap();
        assert_eq!(s.choice, Choice::Soft);
        assert!(s.reason.contains("no active port"));
        let up = vec![
            dev("mlx5_0", false, None, None),
            dev("rxe0", true, None, None),
        ];
        let s = choose(Preference::Auto, "test", &up).unwrap();
        assert_eq!(
            s.choice,
            Choice::Ibv {
                device: "rxe0".into()
            }
        );
    }

    #[test]
    fn explicit_choices_are_obeyed_or_refused() {
        let none: Vec<DeviceInfo> = vec![];
        let up = vec![dev("rxe0", true, None, None)];
        assert_eq!(
            choose(Preference::Soft, "FERRY_FABRIC", &up)
                .unwrap()
                .choice,
            Choice::Soft
        );
        let e = choose(Preference::Ibv, "the configuration", &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ibv requested by the configuration"), "{e}");
        assert!(matches!(
            choose(Preference::Ibv, "x", &up).unwrap().choice,
            Choice::Ibv { .. }
        ));
    }

    #[test]
    fn on_this_host_auto_selection_never_fails() {
        // Without RDMA (CI), auto means soft; with it, ibv. Never an error.
        let s = choose(Preference::Auto, "test", &IbvProvider.devices().unwrap()).unwrap();
        assert!(!s.reason.is_empty());
    }

    #[test]
    fn nearest_prefers_the_same_pcie_switch_then_numa() {
        // A fake sysfs: two root complexes; the GPU and nic1 share a switch.
        let root = std::env::temp_dir().join(format!("ferry-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let devices = root.join("devices");
        let bus = root.join("bus/pci/devices");
        std::fs::create_dir_all(&bus).unwrap();
        let mk = |rel: &str, addr: &str, numa: i32| {
            let d = devices.join(rel);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("numa_node"), format!("{numa}\n")).unwrap();
            std::os::unix::fs::symlink(&d, bus.join(addr)).unwrap();
        };
        mk("pci0000:00/0000:00:01.0/0000:01:00.0", "0000:01:00.0", 0); // nic0
        mk(
            "pci0000:16/0000:16:02.0/0000:17:00.0/0000:18:00.0",
            "0000:18:00.0",
            1,
        ); // gpu
        mk(
            "pci0000:16/0000:16:02.0/0000:17:00.0/0000:19:00.0",
            "0000:19:00.0",
            1,
        ); // nic1, same switch
        mk("pci0000:16/0000:16:03.0/0000:20:00.0", "0000:20:00.0", 1); // nic2, same root only
        let devs = vec![
            dev("nic0", true, Some("0000:01:00.0"), Some(0)),
            dev("nic2", true, Some("0000:20:00.0"), Some(1)),
            dev("nic1", true, Some("0000:19:00.0"), Some(1)),
        ];
        assert_eq!(nearest(&devs, "0000:18:00.0", &root).unwrap().name, "nic1");
        // Without PCI paths for the NICs, NUMA decides.
        let by_numa = vec![dev("a", true, None, Some(0)), dev("b", true, None, Some(1))];
        assert_eq!(nearest(&by_numa, "0000:18:00.0", &root).unwrap().name, "b");
        // Nothing known: the first device.
        let unknown = vec![dev("x", true, None, None), dev("y", true, None, None)];
        assert_eq!(nearest(&unknown, "0000:99:00.0", &root).unwrap().name, "x");
        assert!(nearest(&[], "0000:18:00.0", &root).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
