//! `-netdev`, `-device virtio-net-device` and `-nic`, in QEMU's forms
//! (keyval, and the JSON form libvirt writes), into `NetdevConfig` and
//! `NicConfig`. What would start a process as moat's user (`script=`,
//! `downscript=`, `-netdev bridge`), reach the host kernel's vhost-net
//! (`vhost=on`), or embed a network stack in moat (`-netdev user`) is
//! refused with the reason and what to use instead.

use crate::keyval::{self, KeyVals};
use crate::CliError;
use moat_config::{
    DeviceName, NetBackendConfig, NetdevConfig, NicConfig, RateLimit, MAX_NET_QUEUES,
};

/// QEMU's first default MAC (52:54:00:12:34:56, the last byte counting up
/// per interface).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// An option's argument in either form.
pub fn keyvals(opt: &str, arg: &str, implied: &str) -> Result<KeyVals, CliError> {
    if arg.trim_start().starts_with('{') {
        let mut kv = keyval::parse_json(opt, arg)?;
        // The JSON form names the type "type"; QEMU's keyval form too.
        if let Some(t) = kv.take("type") {
            let mut with = keyval::parse(opt, &format!("{implied}={t}"), None)?;
            while let Some((k, v)) = kv.pop() {
                with.push(k, v);
            }
            return Ok(with);
        }
        return Ok(kv);
    }
    keyval::parse(opt, arg, Some(implied))
}

fn refuse(opt: &str, arg: &str, why: &str) -> CliError {
    CliError::new(opt, arg, why)
}

/// A script option: only "no" (or empty) is accepted.
fn check_script(opt: &str, arg: &str, key: &str, v: Option<String>) -> Result<(), CliError> {
    match v.as_deref() {
        None | Some("") | Some("no") => Ok(()),
        Some(s) => Err(refuse(
            opt,
            arg,
            &format!(
                "{key}={s}: moat never runs scripts (they would run as moat's user, outside the sandbox); \
                 set the tap up beforehand, or hand it in with fd="
            ),
        )),
    }
}

fn parse_fd(opt: &str, arg: &str, v: &str) -> Result<i32, CliError> {
    match v.parse::<i32>() {
        Ok(n) if n > 2 => Ok(n),
        _ => Err(refuse(
            opt,
            arg,
            &format!("'{v}' is not a descriptor number moat inherited (at least 3)"),
        )),
    }
}

/// `-netdev TYPE,id=ID,...` (or one of `-nic`'s backends, with its keys
/// already taken by the caller).
pub fn parse_netdev_kv(opt: &str, arg: &str, kv: &mut KeyVals) -> Result<NetdevConfig, CliError> {
    let kind = kv
        .take("type")
        .ok_or_else(|| refuse(opt, arg, "Parameter 'type' is missing"))?;
    let id = kv
        .take("id")
        .filter(|i| !i.is_empty())
        .ok_or_else(|| refuse(opt, arg, "Parameter 'id' is missing"))?;
    let backend = match kind.as_str() {
        "tap" => {
            check_script(opt, arg, "script", kv.take("script"))?;
            check_script(opt, arg, "downscript", kv.take("downscript"))?;
            for k in ["vhost", "vhostforce"] {
                if let Some(v) = kv.take(k) {
                    if keyval::parse_bool(opt, k, &v)? {
                        return Err(refuse(
                            opt,
                            arg,
                            &format!(
                                "{k}=on: moat does not use the kernel's vhost-net (it widens what a guest \
                                 reaches in the host kernel); its virtio-net device runs in userspace"
                            ),
                        ));
                    }
                }
            }
            for k in ["vhostfd", "vhostfds", "helper", "br"] {
                if kv.take(k).is_some() {
                    return Err(refuse(opt, arg, &format!("'{k}' is not supported by moat")));
                }
            }
            let ifname = kv.take("ifname").filter(|n| !n.is_empty());
            let mut fds = Vec::new();
            if let Some(fd) = kv.take("fd") {
                fds.push(parse_fd(opt, arg, &fd)?);
            }
            if let Some(list) = kv.take("fds") {
                if !fds.is_empty() {
                    return Err(refuse(opt, arg, "fd= and fds= cannot be used together"));
                }
                for f in list.split(':') {
                    fds.push(parse_fd(opt, arg, f)?);
                }
            }
            if ifname.is_some() && !fds.is_empty() {
                return Err(refuse(
                    opt,
                    arg,
                    "ifname= and fd=/fds= cannot be used together",
                ));
            }
            let queues = match kv.take("queues") {
                Some(q) => {
                    let n = keyval::parse_u64(opt, "queues", &q)?;
                    usize::try_from(n)
                        .ok()
                        .filter(|n| (1..=MAX_NET_QUEUES).contains(n))
                        .ok_or_else(|| {
                            refuse(opt, arg, &format!("queues={q}: 1 to {MAX_NET_QUEUES}"))
                        })?
                }
                None => fds.len().max(1),
            };
            if !fds.is_empty() && fds.len() != queues {
                return Err(refuse(
                    opt,
                    arg,
                    &format!("{} descriptors given for {queues} queues", fds.len()),
                ));
            }
            let vnet_hdr = match kv.take("vnet_hdr") {
                Some(v) => Some(keyval::parse_bool(opt, "vnet_hdr", &v)?),
                None => None,
            };
            if let Some(s) = kv.take("sndbuf") {
                keyval::parse_size(opt, &s, 1)?;
            }
            NetBackendConfig::Tap {
                ifname,
                fds,
                queues,
                vnet_hdr,
            }
        }
        "stream" => {
            match kv.take("server").as_deref() {
                None => {}
                Some(v) if !keyval::parse_bool(opt, "server", v)? => {}
                Some(_) => {
                    return Err(refuse(
                        opt,
                        arg,
                        "server=on is not supported: moat connects to the peer (passt listens)",
                    ))
                }
            }
            match kv.take("addr.type").as_deref() {
                Some("unix") => {}
                Some(t) => {
                    return Err(refuse(
                        opt,
                        arg,
                        &format!("addr.type={t}: moat connects to UNIX sockets only"),
                    ))
                }
                None => return Err(refuse(opt, arg, "Parameter 'addr.type' is missing")),
            }
            let path = kv
                .take("addr.path")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| refuse(opt, arg, "Parameter 'addr.path' is missing"))?;
            if let Some(a) = kv.take("addr.abstract") {
                if keyval::parse_bool(opt, "addr.abstract", &a)? {
                    return Err(refuse(opt, arg, "abstract sockets are not supported"));
                }
            }
            NetBackendConfig::Stream { path: path.into() }
        }
        "user" => {
            return Err(refuse(
                opt,
                arg,
                "-netdev user is not offered (it runs a network stack inside moat); \
                 for networking without privileges run passt and use \
                 -netdev stream,id=ID,server=off,addr.type=unix,addr.path=PASST_SOCKET",
            ))
        }
        "bridge" => {
            return Err(refuse(
                opt,
                arg,
                "-netdev bridge is not offered (it runs qemu-bridge-helper as moat's user); \
                 attach a tap to the bridge beforehand and use -netdev tap,ifname= or fd=",
            ))
        }
        t => {
            return Err(refuse(
                opt,
                arg,
                &format!("unsupported netdev type '{t}' (moat offers tap and stream)"),
            ))
        }
    };
    Ok(NetdevConfig { id, backend })
}

/// A MAC address `xx:xx:xx:xx:xx:xx`, unicast and not all zero.
pub fn parse_mac(opt: &str, arg: &str, v: &str) -> Result<[u8; 6], CliError> {
    let bad = || refuse(opt, arg, &format!("mac={v}: expected xx:xx:xx:xx:xx:xx"));
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(refuse(
            opt,
            arg,
            &format!("mac={v}: a multicast address cannot be an interface's"),
        ));
    }
    if mac == [0; 6] {
        return Err(refuse(
            opt,
            arg,
            &format!("mac={v}: the all-zero address is not valid"),
        ));
    }
    Ok(mac)
}

/// The rate-limit keys of `-device virtio-net-device` (moat's own):
/// `rx-bps`, `rx-bps-burst`, `rx-pps`, `rx-pps-burst`, and `tx-…`.
fn parse_limits(opt: &str, kv: &mut KeyVals, dir: &str) -> Result<RateLimit, CliError> {
    let mut l = RateLimit::default();
    for (key, field) in RateLimit::KEYS.into_iter().zip(l.fields_mut()) {
        let k = format!("{dir}-{key}");
        if let Some(v) = kv.take(&k) {
            *field = keyval::parse_u64(opt, &k, &v)?;
        }
    }
    Ok(l)
}

/// The device-side keys of an interface (`-device virtio-net-device` or
/// `-nic`), with the netdev resolved later.
#[derive(Debug, Clone)]
pub struct NicKeys {
    pub id: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mq: bool,
    pub host_mtu: Option<u16>,
    pub rx: RateLimit,
    pub tx: RateLimit,
}

pub fn parse_nic_keys(opt: &str, arg: &str, kv: &mut KeyVals) -> Result<NicKeys, CliError> {
    let mac = match kv.take("mac") {
        Some(m) => Some(parse_mac(opt, arg, &m)?),
        None => None,
    };
    let mq = match kv.take("mq") {
        Some(v) => keyval::parse_bool(opt, "mq", &v)?,
        None => false,
    };
    let host_mtu = match kv.take("host_mtu") {
        Some(v) => {
            let n = keyval::parse_u64(opt, "host_mtu", &v)?;
            Some(
                u16::try_from(n)
                    .ok()
                    .filter(|n| (68..=65535).contains(n))
                    .ok_or_else(|| refuse(opt, arg, "host_mtu must be between 68 and 65535"))?,
            )
        }
        None => None,
    };
    let rx = parse_limits(opt, kv, "rx")?;
    let tx = parse_limits(opt, kv, "tx")?;
    let id = kv.take("id");
    Ok(NicKeys {
        id,
        mac,
        mq,
        host_mtu,
        rx,
        tx,
    })
}

/// An interface from its keys and its netdev; `index` counts interfaces
/// for the default MAC.
pub fn nic(keys: NicKeys, netdev: NetdevConfig, index: usize, qdev: DeviceName) -> NicConfig {
    let mut mac = DEFAULT_MAC;
    mac[5] = mac[5].wrapping_add(index as u8);
    NicConfig {
        id: keys.id,
        qdev,
        netdev,
        mac: keys.mac.unwrap_or(mac),
        mq: keys.mq,
        host_mtu: keys.host_mtu,
        rx_limit: keys.rx,
        tx_limit: keys.tx,
    }
}
