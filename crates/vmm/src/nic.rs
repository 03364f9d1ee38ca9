//! Network interfaces across boots: each `-netdev` backend is opened once,
//! before the sandbox and before moat closes what it inherited (a tap by
//! name, which needs CAP_NET_ADMIN unless the tap is the user's; taps handed
//! in as descriptors, libvirt's way; a stream socket connected to passt),
//! and every boot's virtio-net device runs over it.

use moat_config::{NetBackendConfig, NicConfig};
use moat_devices::virtio::net::{NetLink, NetPort};
use moat_net::{Backend, Stream, Tap};

/// An opened interface and the names the monitor knows it by.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The NIC's name: the device id, else QEMU's `virtio-net-device.N`.
    pub name: String,
    /// The netdev's id (`set_link` takes either name).
    pub netdev: String,
    /// QOM path, as NIC_RX_FILTER_CHANGED reports it.
    pub path: String,
    /// The device has an id (the event then carries its name).
    pub has_id: bool,
    pub port: NetPort,
    /// HMP `info network`: each queue's name (the first is `name`) and
    /// what QEMU says of the netdev's queue below it.
    pub queues: Vec<(String, String)>,
    /// `tap` or `stream`.
    pub kind: &'static str,
}

/// Why an interface could not be opened, worded as QEMU words it.
fn netdev_err(nic: &NicConfig, why: impl std::fmt::Display) -> String {
    format!("-netdev {}: {why}", nic.netdev.id)
}

/// Open every interface of `nics`. Call before `close_inherited`: taps
/// handed in by number are taken (duplicated) here.
pub fn open(nics: &[NicConfig]) -> Result<Vec<Nic>, String> {
    // QEMU names a queue without an id `virtio-net-device.N`, N counting
    // the queues of the NICs made before it (an id names a first queue).
    let mut made = 0;
    nics.iter()
        .map(|n| {
            let (backends, infos): (Vec<Backend>, Vec<String>) =
                open_backends(n)?.into_iter().unzip();
            let queues: Vec<(String, String)> = infos
                .into_iter()
                .enumerate()
                .map(|(q, info)| match (&n.id, q) {
                    (Some(id), 0) => (id.clone(), info),
                    _ => (format!("virtio-net-device.{}", made + q), info),
                })
                .collect();
            made += queues.len();
            let port = NetPort::new(
                backends,
                n.host_mtu,
                NetLink::new(n.mac, n.rx_limit, n.tx_limit),
            )
            .map_err(|e| netdev_err(n, e))?;
            Ok(Nic {
                name: queues[0].0.clone(),
                netdev: n.netdev.id.clone(),
                path: n.qdev.qom_path(),
                has_id: n.id.is_some(),
                port,
                queues,
                kind: match n.netdev.backend {
                    NetBackendConfig::Tap { .. } => "tap",
                    NetBackendConfig::Stream { .. } => "stream",
                },
            })
        })
        .collect()
}

/// The backends of one interface, one per queue pair it offers, each with
/// what QEMU's `info network` says of it.
fn open_backends(n: &NicConfig) -> Result<Vec<(Backend, String)>, String> {
    let pairs = n.queue_pairs();
    match &n.netdev.backend {
        NetBackendConfig::Tap {
            ifname,
            fds,
            queues,
            vnet_hdr,
        } => {
            let taps = if fds.is_empty() {
                let name = ifname.as_deref().unwrap_or("");
                let taps = Tap::open(name, *queues, vnet_hdr.unwrap_or(true)).map_err(|e| {
                    netdev_err(n, format!("could not configure /dev/net/tun ({name}): {e}"))
                })?;
                // (moat never runs scripts.)
                let info = |t: &Tap| format!("ifname={},script=no,downscript=no", t.name());
                taps.into_iter().map(|t| (info(&t), t)).collect::<Vec<_>>()
            } else {
                fds.iter()
                    .map(|&fd| {
                        let owned = moat_sys::fdset::take_inherited(i64::from(fd))
                            .map_err(|e| netdev_err(n, format!("fd={fd}: {e}")))?;
                        let tap = Tap::from_fd(owned)
                            .map_err(|e| netdev_err(n, format!("fd={fd}: {e}")))?;
                        Ok((format!("fd={fd}"), tap))
                    })
                    .collect::<Result<Vec<_>, String>>()?
            };
            if *vnet_hdr == Some(true) && !taps.iter().all(|(_, t)| t.vnet_hdr()) {
                return Err(netdev_err(
                    n,
                    "vnet_hdr=1 requested, but no kernel support for IFF_VNET_HDR available",
                ));
            }
            Ok(taps
                .into_iter()
                .take(pairs)
                .map(|(info, t)| (Backend::Tap(t), info))
                .collect())
        }
        NetBackendConfig::Stream { path } => {
            let sock = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| netdev_err(n, format!("connect to {}: {e}", path.display())))?;
            let s = Stream::new(sock).map_err(|e| netdev_err(n, e))?;
            Ok(vec![(
                Backend::Stream(s),
                format!("unix:{}", path.display()),
            )])
        }
    }
}
