//! Port counters from the fixture sysfs trees: an mlx5-like one with `hw_counters/` and a plain
//! one, whose counters advance between reads.

mod common;

use common::Fixture;
use tally_rdma::sysfs;

#[test]
fn mlx5_tree_lists_devices_with_their_pci_functions_and_ports() {
    let fx = Fixture::new("mlx5");
    let devices = sysfs::devices(fx.root()).unwrap();
    let names: Vec<_> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["mlx5_0", "mlx5_1"]);
    assert_eq!(devices[0].pci_address.as_deref(), Some("0000:3b:00.0"));
    assert_eq!(devices[1].pci_address.as_deref(), Some("0000:3b:00.2"));
    assert_eq!(devices[0].ports, [1]);
}

#[test]
fn data_counters_are_four_octet_units_and_advance_between_reads() {
    let fx = Fixture::new("mlx5");
    let before = sysfs::read_port(fx.root(), "mlx5_0", 1).unwrap();
    assert_eq!(before.state.as_deref(), Some("ACTIVE"));
    assert_eq!(before.link_layer.as_deref(), Some("InfiniBand"));
    assert_eq!(before.rate.as_deref(), Some("400 Gb/sec (4X NDR)"));
    assert_eq!(before.transmit_bytes(), Some(2_000_000_000));
    assert_eq!(before.receive_bytes(), Some(1_000_000_000));
    assert_eq!(before.transmit_packets(), Some(2_000_000));
    assert_eq!(before.receive_packets(), Some(1_000_000));
    assert_eq!(before.hw_counters.get("rx_write_requests"), Some(&12345));
    assert!(
        !before.hw_counters.contains_key("lifespan"),
        "lifespan is a setting, not a counter"
    );
    assert_eq!(before.counters.len(), 21);

    fx.set("mlx5_0", 1, "counters", "port_xmit_data", 500_000_250);
    fx.set("mlx5_0", 1, "counters", "port_xmit_packets", 2_000_010);
    fx.set("mlx5_0", 1, "hw_counters", "out_of_sequence", 3);
    let after = sysfs::read_port(fx.root(), "mlx5_0", 1).unwrap();
    assert_eq!(
        after.transmit_bytes().unwrap() - before.transmit_bytes().unwrap(),
        1000
    );
    assert_eq!(after.transmit_packets(), Some(2_000_010));
    assert_eq!(after.hw_counters.get("out_of_sequence"), Some(&3));
}

#[test]
fn plain_tree_has_counters_only() {
    let fx = Fixture::new("plain");
    let devices = sysfs::devices(fx.root()).unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].ports, [1, 2]);
    let up = sysfs::read_port(fx.root(), "qib0", 1).unwrap();
    assert!(up.hw_counters.is_empty());
    assert_eq!(up.transmit_bytes(), Some(32_000));
    let down = sysfs::read_port(fx.root(), "qib0", 2).unwrap();
    assert_eq!(down.state.as_deref(), Some("DOWN"));
    assert_eq!(down.receive_bytes(), Some(0));
    fx.set("qib0", 1, "counters", "port_rcv_data", 5000);
    let later = sysfs::read_port(fx.root(), "qib0", 1).unwrap();
    assert_eq!(later.receive_bytes(), Some(20_000));
}

#[test]
fn unreadable_and_garbled_counters_are_left_out() {
    let fx = Fixture::new("plain");
    let counters = fx.root().join("class/infiniband/qib0/ports/1/counters");
    std::fs::write(counters.join("symbol_error"), "N/A\n").unwrap();
    std::fs::create_dir(counters.join("not_a_file")).unwrap();
    let port = sysfs::read_port(fx.root(), "qib0", 1).unwrap();
    assert!(!port.counters.contains_key("symbol_error"));
    assert!(!port.counters.contains_key("not_a_file"));
    assert_eq!(port.counters.get("link_downed"), Some(&0));
    // A port that does not exist is an error naming it.
    let err = sysfs::read_port(fx.root(), "qib0", 9).unwrap_err();
    assert!(err.to_string().contains("qib0/ports/9"), "{err}");
}

#[test]
fn no_class_directory_means_no_devices() {
    let empty = tempfile::tempdir().unwrap();
    assert!(sysfs::devices(empty.path()).unwrap().is_empty());
}
