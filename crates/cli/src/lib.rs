//! QEMU-compatible command line -> one typed, validated [`VmConfig`].
//!
//! Nothing downstream of this crate reads raw option strings. Every option
//! and sub-key we do not support is an error naming it (exit status 1 at
//! the binary's edge), never silently ignored.

pub mod keyval;
pub mod net;

use moat_config::*;
use std::path::PathBuf;

/// A command-line error: names the option and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option} {value}: {why}")]
pub struct CliError {
    pub option: String,
    pub value: String,
    pub why: String,
}

impl CliError {
    pub fn new(option: &str, value: &str, why: &str) -> Self {
        CliError {
            option: option.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// What parsing has gathered so far: the config, and what is only known
/// once every option has been read (chardevs for `-mon`, `if=none` drives
/// for `-device`, the serial ports).
#[derive(Default)]
struct Parser {
    cfg: VmConfig,
    serials: Vec<Option<SerialBackend>>,
    nodefaults: bool,
    chardevs: Vec<(String, SocketChardev)>,
    mons: Vec<(String, MonitorMode, String)>,
    /// `-drive`s, and whether a device uses each (`if=virtio` ones do).
    backends: Vec<(DriveConfig, bool)>,
    /// `-netdev`s, and the interfaces waiting for theirs (device keys, the
    /// netdev id, the option's text).
    netdevs: Vec<NetdevConfig>,
    /// (With the device's name; `None` for `-nic`'s, named at the end.)
    nics: Vec<(net::NicKeys, String, String, Option<DeviceName>)>,
    /// virtio-rng devices waiting for their `-object` (and the option's text).
    rngs: Vec<(RngConfig, String)>,
    /// Devices named so far: ids taken, and how many had none.
    device_ids: Vec<String>,
    anonymous_devices: usize,
    /// `-h` or `-version`: stop and do that.
    done: Option<Action>,
}

/// What an option does: a flag, or a handler of its argument.
enum Handler {
    Flag(fn(&mut Parser)),
    Arg(fn(&mut Parser, &str, &str) -> Result<(), CliError>),
}

/// Every option moat accepts: its names (`-name` and `--name` both work)
/// and what it does. One table: an option is added here and nowhere else.
const OPTIONS: &[(&[&str], Handler)] = &[
    (
        &["h", "help"],
        Handler::Flag(|p| p.done = Some(Action::Help)),
    ),
    (
        &["version"],
        Handler::Flag(|p| p.done = Some(Action::Version)),
    ),
    (&["enable-kvm", "nographic"], Handler::Flag(|_| {})),
    (&["nodefaults"], Handler::Flag(|p| p.nodefaults = true)),
    (&["no-reboot"], Handler::Flag(|p| p.cfg.no_reboot = true)),
    (&["S"], Handler::Flag(|p| p.cfg.start_paused = true)),
    (
        &["M", "machine"],
        Handler::Arg(|p, o, a| parse_machine(o, a, &mut p.cfg)),
    ),
    (&["accel"], Handler::Arg(|_, o, a| parse_accel(o, a))),
    (&["cpu"], Handler::Arg(|_, o, a| parse_cpu(o, a))),
    (
        &["m"],
        Handler::Arg(|p, o, a| parse_mem(o, a).map(|v| p.cfg.mem_size = v)),
    ),
    (
        &["smp"],
        Handler::Arg(|p, o, a| parse_smp(o, a).map(|v| p.cfg.smp = v)),
    ),
    (
        &["kernel"],
        Handler::Arg(|p, o, a| nonempty_path(o, a).map(|v| p.cfg.kernel = Some(v))),
    ),
    (
        &["initrd"],
        Handler::Arg(|p, o, a| nonempty_path(o, a).map(|v| p.cfg.initrd = Some(v))),
    ),
    (
        &["append"],
        Handler::Arg(|p, _, a| {
            p.cfg.append = a.to_string();
            Ok(())
        }),
    ),
    (
        &["serial"],
        Handler::Arg(|p, o, a| parse_serial(o, a).map(|v| p.serials.push(v))),
    ),
    (&["display"], Handler::Arg(|_, o, a| parse_display(o, a))),
    (
        &["name"],
        Handler::Arg(|p, o, a| parse_name(o, a, &mut p.cfg)),
    ),
    (
        &["pidfile"],
        Handler::Arg(|p, o, a| nonempty_path(o, a).map(|v| p.cfg.pidfile = Some(v))),
    ),
    (
        &["uuid"],
        Handler::Arg(|p, o, a| parse_uuid(o, a).map(|v| p.cfg.uuid = Some(v))),
    ),
    (
        &["add-fd"],
        Handler::Arg(|p, o, a| parse_add_fd(o, a).map(|v| p.cfg.add_fds.push(v))),
    ),
    (
        &["runas"],
        Handler::Arg(|p, o, a| parse_run_as(o, a, a).map(|v| p.cfg.run_as = Some(v))),
    ),
    (
        &["chroot"],
        Handler::Arg(|p, o, a| nonempty_path(o, a).map(|v| p.cfg.chroot = Some(v))),
    ),
    (
        &["run-with"],
        Handler::Arg(|p, o, a| parse_run_with(o, a, &mut p.cfg)),
    ),
    (
        &["sandbox"],
        Handler::Arg(|p, o, a| {
            (p.cfg.sandbox, p.cfg.landlock_required) = parse_sandbox(o, a)?;
            Ok(())
        }),
    ),
    (&["drive"], Handler::Arg(Parser::drive)),
    (&["device"], Handler::Arg(Parser::device)),
    (&["netdev"], Handler::Arg(Parser::netdev)),
    (&["nic"], Handler::Arg(Parser::nic)),
    (&["object"], Handler::Arg(Parser::object)),
    (
        &["qmp"],
        Handler::Arg(|p, o, a| {
            let socket = legacy_socket(o, a)?;
            p.cfg.monitors.push(MonitorConfig {
                mode: MonitorMode::Control,
                socket,
            });
            Ok(())
        }),
    ),
    (
        &["monitor"],
        Handler::Arg(|p, o, a| {
            if a != "none" {
                let socket = legacy_socket(o, a)?;
                p.cfg.monitors.push(MonitorConfig {
                    mode: MonitorMode::Readline,
                    socket,
                });
            }
            Ok(())
        }),
    ),
    (&["chardev"], Handler::Arg(Parser::chardev)),
    (&["mon"], Handler::Arg(Parser::mon)),
];

/// Parse the arguments after the program name.
pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Action, CliError> {
    let mut p = Parser::default();
    let mut it = args.iter().map(|s| s.as_ref());
    while let Some(raw) = it.next() {
        let name = raw
            .strip_prefix("--")
            .or_else(|| raw.strip_prefix('-'))
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CliError::new(raw, "", "not an option (options start with '-')"))?;
        let opt = format!("-{name}");
        let handler = OPTIONS
            .iter()
            .find(|(names, _)| names.contains(&name))
            .map(|(_, h)| h)
            .ok_or_else(|| CliError::new(&opt, "", "invalid option"))?;
        match handler {
            Handler::Flag(f) => f(&mut p),
            Handler::Arg(f) => {
                let arg = it
                    .next()
                    .ok_or_else(|| CliError::new(&opt, "", "requires an argument"))?;
                f(&mut p, &opt, arg)?;
            }
        }
        if let Some(action) = p.done.take() {
            return Ok(action);
        }
    }
    p.finish().map(|cfg| Action::Run(Box::new(cfg)))
}

impl Parser {
    fn drive(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let index = self.backends.len() + self.cfg.empty_drives.len();
        if let Some(id) = parse_empty_drive(opt, arg)? {
            self.check_drive_id(opt, arg, &id)?;
            self.cfg.empty_drives.push(DriveConfig::empty(&id, index));
            return Ok(());
        }
        let (mut d, virtio) = parse_drive(opt, arg)?;
        d.index = index;
        if let Some(id) = &d.id {
            self.check_drive_id(opt, arg, id)?;
        }
        if virtio {
            self.cfg.drives.push(d.clone());
        }
        self.backends.push((d, virtio));
        Ok(())
    }

    fn check_drive_id(&self, opt: &str, arg: &str, id: &str) -> Result<(), CliError> {
        let taken = self
            .backends
            .iter()
            .any(|(b, _)| b.id.as_deref() == Some(id))
            || self
                .cfg
                .empty_drives
                .iter()
                .any(|e| e.id.as_deref() == Some(id));
        match taken {
            true => Err(CliError::new(
                opt,
                arg,
                &format!("Duplicate ID '{id}' for drive"),
            )),
            false => Ok(()),
        }
    }

    fn device(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let mut kv = net::keyvals(opt, arg, "driver")?;
        const OFFERED: &str =
            "moat offers virtio-blk-device, virtio-net-device, virtio-rng-device and virtio-vsock-device";
        match kv.take("driver").as_deref() {
            Some("virtio-blk-device") | Some("virtio-blk") => {}
            Some("virtio-net-device") => return self.net_device(opt, arg, kv),
            Some("virtio-rng-device") => return self.rng_device(opt, arg, kv),
            Some("virtio-vsock-device") => return self.vsock_device(opt, arg, kv),
            Some(
                d @ ("vhost-vsock-device" | "vhost-vsock-pci" | "vhost-user-vsock-device"
                | "vhost-user-vsock-pci"),
            ) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!(
                        "'{d}' hands the guest's sockets to the host kernel (/dev/vhost-vsock) or to a separate daemon; moat's vsock is in the VMM: use -device virtio-vsock-device,guest-cid=N,uds-path=PATH"
                    ),
                ))
            }
            Some(
                d @ ("virtio-net-pci" | "virtio-net" | "virtio-blk-pci" | "virtio-rng-pci"
                | "virtio-rng"),
            ) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("'{d}' needs PCI, which moat's microvm does not have ({OFFERED})"),
                ))
            }
            Some("help") | Some("?") => return Err(CliError::new(opt, arg, OFFERED)),
            Some(d) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("unsupported device '{d}' ({OFFERED})"),
                ))
            }
            None => return Err(CliError::new(opt, arg, "a device driver is required")),
        }
        let drive = kv
            .take("drive")
            .ok_or_else(|| CliError::new(opt, arg, "Parameter 'drive' is missing"))?;
        let serial = kv.take("serial");
        let werror = on_error(opt, arg, &mut kv, false)?;
        let rerror = on_error(opt, arg, &mut kv, true)?;
        let num_queues = match kv.take("num-queues") {
            None => 1,
            Some(v) => {
                let n = keyval::parse_u64(opt, "num-queues", &v)?;
                if n == 0 {
                    return Err(CliError::new(
                        opt,
                        arg,
                        "num-queues property must be larger than 0",
                    ));
                }
                u16::try_from(n)
                    .ok()
                    .filter(|&n| n <= moat_config::MAX_BLK_QUEUES)
                    .ok_or_else(|| {
                        CliError::new(
                            opt,
                            arg,
                            &format!(
                                "num-queues property must be <= {} (one moat thread each)",
                                moat_config::MAX_BLK_QUEUES
                            ),
                        )
                    })?
            }
        };
        let id = kv.take("id");
        kv.finish(opt, arg)?;
        if self
            .cfg
            .empty_drives
            .iter()
            .any(|e| e.id.as_ref() == Some(&drive))
        {
            return Err(CliError::new(
                opt,
                arg,
                "Device needs media, but drive is empty",
            ));
        }
        let qdev = self.device_name(opt, arg, id)?;
        let (d, used) = self
            .backends
            .iter_mut()
            .find(|(b, _)| b.id.as_deref() == Some(drive.as_str()))
            .ok_or_else(|| {
                CliError::new(
                    opt,
                    arg,
                    &format!("Property 'virtio-blk-device.drive' can't find value '{drive}'"),
                )
            })?;
        if *used {
            return Err(CliError::new(
                opt,
                arg,
                &format!("drive '{drive}' is already in use"),
            ));
        }
        *used = true;
        let mut d = d.clone();
        if serial.is_some() {
            d.serial = serial;
        }
        d.werror = werror.unwrap_or(d.werror);
        d.rerror = rerror.unwrap_or(d.rerror);
        d.num_queues = num_queues;
        d.qdev = Some(qdev);
        self.cfg.drives.push(d);
        Ok(())
    }

    /// A `-device`'s name: its id (QEMU's check: no two devices share
    /// one), else the next place among the devices without one.
    fn device_name(
        &mut self,
        opt: &str,
        arg: &str,
        id: Option<String>,
    ) -> Result<DeviceName, CliError> {
        match id {
            Some(id) if self.device_ids.contains(&id) => Err(CliError::new(
                opt,
                arg,
                &format!("Duplicate ID '{id}' for device"),
            )),
            Some(id) => {
                self.device_ids.push(id.clone());
                Ok(DeviceName::Id(id))
            }
            None => {
                self.anonymous_devices += 1;
                Ok(DeviceName::Anonymous(self.anonymous_devices - 1))
            }
        }
    }

    fn net_device(
        &mut self,
        opt: &str,
        arg: &str,
        mut kv: keyval::KeyVals,
    ) -> Result<(), CliError> {
        let netdev = kv
            .take("netdev")
            .ok_or_else(|| CliError::new(opt, arg, "Parameter 'netdev' is missing"))?;
        let keys = net::parse_nic_keys(opt, arg, &mut kv)?;
        kv.finish(opt, arg)?;
        let qdev = self.device_name(opt, arg, keys.id.clone())?;
        self.nics.push((keys, netdev, arg.to_string(), Some(qdev)));
        Ok(())
    }

    /// `-device virtio-vsock-device,guest-cid=N,uds-path=PATH[,id=ID]`:
    /// one per VM (a Linux guest drives only one).
    fn vsock_device(
        &mut self,
        opt: &str,
        arg: &str,
        mut kv: keyval::KeyVals,
    ) -> Result<(), CliError> {
        let id = kv.take("id");
        let cid = kv
            .take("guest-cid")
            .ok_or_else(|| CliError::new(opt, arg, "Parameter 'guest-cid' is missing"))?;
        let guest_cid = keyval::parse_u64(opt, "guest-cid", &cid)?;
        if !(3..=moat_config::VSOCK_MAX_CID).contains(&guest_cid) {
            return Err(CliError::new(
                opt,
                arg,
                &format!(
                    "guest-cid property must be greater than 2 and at most {}",
                    moat_config::VSOCK_MAX_CID
                ),
            ));
        }
        let uds_path = kv
            .take("uds-path")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| CliError::new(opt, arg, "Parameter 'uds-path' is missing"))?;
        kv.finish(opt, arg)?;
        // `<path>_<port>` must still fit a sockaddr_un (108 bytes with NUL).
        if uds_path.len() + "_4294967295".len() >= 108 {
            return Err(CliError::new(
                opt,
                arg,
                "uds-path is too long for a UNIX socket address (with _<port> it must stay under 108 bytes)",
            ));
        }
        if self.cfg.vsock.is_some() {
            return Err(CliError::new(
                opt,
                arg,
                "only one virtio-vsock-device per VM (a guest drives only one)",
            ));
        }
        let qdev = self.device_name(opt, arg, id)?;
        self.cfg.vsock = Some(moat_config::VsockConfig {
            qdev,
            guest_cid,
            uds_path: PathBuf::from(uds_path),
        });
        Ok(())
    }

    /// `-device virtio-rng-device,rng=ID,max-bytes=N,period=MS` (QEMU's
    /// keys and defaults; the backend is resolved once every `-object` is
    /// known, as QEMU creates objects before devices).
    fn rng_device(
        &mut self,
        opt: &str,
        arg: &str,
        mut kv: keyval::KeyVals,
    ) -> Result<(), CliError> {
        let id = kv.take("id");
        let object = kv.take("rng");
        let max_bytes = match kv.take("max-bytes") {
            None => moat_config::RNG_DEFAULT_MAX_BYTES,
            Some(v) => keyval::parse_u64(opt, "max-bytes", &v)
                .ok()
                .filter(|&n| i64::try_from(n).is_ok())
                .ok_or_else(|| {
                    CliError::new(
                        opt,
                        arg,
                        "'max-bytes' parameter must be non-negative, and less than 2^63",
                    )
                })?,
        };
        let period_ms = match kv.take("period") {
            None => moat_config::RNG_DEFAULT_PERIOD_MS,
            Some(v) => keyval::parse_u64(opt, "period", &v).and_then(|n| {
                u32::try_from(n)
                    .map_err(|_| CliError::new(opt, arg, "Parameter 'period' expects uint32_t"))
            })?,
        };
        if period_ms == 0 {
            return Err(CliError::new(
                opt,
                arg,
                "'period' parameter expects a positive integer",
            ));
        }
        kv.finish(opt, arg)?;
        let qdev = self.device_name(opt, arg, id)?;
        self.rngs.push((
            RngConfig {
                qdev,
                object,
                source: RngSource::Builtin,
                max_bytes,
                period_ms,
            },
            arg.to_string(),
        ));
        Ok(())
    }

    fn netdev(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let mut kv = net::keyvals(opt, arg, "type")?;
        let n = net::parse_netdev_kv(opt, arg, &mut kv)?;
        kv.finish(opt, arg)?;
        if self.netdevs.iter().any(|d| d.id == n.id) {
            return Err(CliError::new(
                opt,
                arg,
                &format!("Duplicate ID '{}' for netdev", n.id),
            ));
        }
        self.netdevs.push(n);
        Ok(())
    }

    /// `-nic TYPE,...`: a netdev and its virtio-net-device in one.
    fn nic(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let mut kv = net::keyvals(opt, arg, "type")?;
        if kv.clone().take("type").as_deref() == Some("none") {
            return Ok(());
        }
        match kv.take("model").as_deref() {
            None | Some("virtio-net-device") => {}
            Some(m) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("model={m}: moat offers model=virtio-net-device"),
                ))
            }
        }
        let keys = net::parse_nic_keys(opt, arg, &mut kv)?;
        let id = format!("__nic{}", self.nics.len());
        kv.push("id".into(), id.clone());
        let n = net::parse_netdev_kv(opt, arg, &mut kv)?;
        kv.finish(opt, arg)?;
        self.netdevs.push(n);
        self.nics.push((keys, id, arg.to_string(), None));
        Ok(())
    }

    fn object(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let o = parse_object(opt, arg)?;
        if self.cfg.objects.iter().any(|x| x.id() == o.id()) {
            return Err(CliError::new(
                opt,
                arg,
                &format!("attempt to add duplicate property '{}'", o.id()),
            ));
        }
        self.cfg.objects.push(o);
        Ok(())
    }

    fn chardev(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let (id, c) = parse_chardev(opt, arg)?;
        if self.chardevs.iter().any(|(i, _)| *i == id) {
            return Err(CliError::new(
                opt,
                arg,
                &format!("duplicate chardev id '{id}'"),
            ));
        }
        self.chardevs.push((id, c));
        Ok(())
    }

    fn mon(&mut self, opt: &str, arg: &str) -> Result<(), CliError> {
        let mut kv = keyval::parse(opt, arg, Some("chardev"))?;
        let chardev = kv
            .take("chardev")
            .ok_or_else(|| CliError::new(opt, arg, "Parameter 'chardev' is missing"))?;
        let mode = match kv.take("mode").as_deref() {
            None | Some("readline") => MonitorMode::Readline,
            Some("control") => MonitorMode::Control,
            Some(m) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("invalid monitor mode '{m}' (control or readline)"),
                ))
            }
        };
        if let Some(v) = kv.take("pretty") {
            keyval::parse_bool(opt, "pretty", &v)?;
        }
        kv.take("id");
        kv.finish(opt, arg)?;
        self.mons.push((chardev, mode, arg.to_string()));
        Ok(())
    }

    /// Checks that need every option: devices, monitors, the serial port,
    /// options that only make sense together.
    fn finish(mut self) -> Result<VmConfig, CliError> {
        let cfg = &mut self.cfg;
        // (An if=none drive no device uses stays, as in QEMU: opened and
        // listed by the monitor.)
        for (d, used) in &self.backends {
            if !used {
                cfg.spare_drives.push(d.clone());
            }
        }
        // The devices `-drive if=virtio` and `-nic` imply come after every
        // `-device`, as QEMU creates them.
        for d in cfg.drives.iter_mut().filter(|d| d.qdev.is_none()) {
            self.anonymous_devices += 1;
            d.qdev = Some(DeviceName::Anonymous(self.anonymous_devices - 1));
        }
        for (i, (keys, id, arg, qdev)) in std::mem::take(&mut self.nics).into_iter().enumerate() {
            let opt = "-device";
            let Some(pos) = self.netdevs.iter().position(|n| n.id == id) else {
                let why = if cfg.nics.iter().any(|n| n.netdev.id == id) {
                    format!(
                        "Property 'virtio-net-device.netdev' can't take value '{id}', it's in use"
                    )
                } else {
                    format!("Property 'virtio-net-device.netdev' can't find value '{id}'")
                };
                return Err(CliError::new(opt, &arg, &why));
            };
            let qdev = qdev.unwrap_or_else(|| {
                self.anonymous_devices += 1;
                DeviceName::Anonymous(self.anonymous_devices - 1)
            });
            let nic = net::nic(keys, self.netdevs.remove(pos), i, qdev);
            if nic.queue_pairs() > cfg.smp.cpus as usize {
                return Err(CliError::new(
                    opt,
                    &arg,
                    &format!(
                        "mq=on with {} queues: more queue pairs than the {} vCPUs",
                        nic.queue_pairs(),
                        cfg.smp.cpus
                    ),
                ));
            }
            cfg.nics.push(nic);
        }
        for n in &self.netdevs {
            log::warn!("-netdev id={}: no device uses it", n.id);
        }
        for (mut rng, arg) in std::mem::take(&mut self.rngs) {
            if let Some(id) = &rng.object {
                let in_use = cfg.rngs.iter().any(|r| r.object.as_ref() == Some(id));
                match cfg.objects.iter().find(|o| o.id() == id) {
                    Some(Object::Rng { source, .. }) if !in_use => rng.source = source.clone(),
                    Some(Object::Rng { .. }) => {
                        return Err(CliError::new(
                            "-device",
                            &arg,
                            &format!(
                                "Property 'virtio-rng-device.rng' can't take value '{id}', it's in use"
                            ),
                        ))
                    }
                    Some(_) => {
                        return Err(CliError::new(
                            "-device",
                            &arg,
                            &format!("Invalid parameter type for 'rng', expected: rng-backend ('{id}' is not one)"),
                        ))
                    }
                    None => {
                        return Err(CliError::new(
                            "-device",
                            &arg,
                            &format!("Property 'virtio-rng-device.rng' can't find value '{id}'"),
                        ))
                    }
                }
            }
            cfg.rngs.push(rng);
        }
        if cfg.drives.len() + cfg.nics.len() + cfg.rngs.len() + usize::from(cfg.vsock.is_some())
            > MAX_VIRTIO_DEVICES
        {
            return Err(CliError::new(
                "-device",
                "",
                &format!("at most {MAX_VIRTIO_DEVICES} virtio devices"),
            ));
        }
        for (chardev, mode, arg) in self.mons {
            let socket = self
                .chardevs
                .iter()
                .find(|(id, _)| *id == chardev)
                .map(|(_, c)| c.clone())
                .ok_or_else(|| {
                    CliError::new("-mon", &arg, &format!("chardev '{chardev}' not found"))
                })?;
            cfg.monitors.push(MonitorConfig { mode, socket });
        }
        for m in &cfg.monitors {
            check_monitor_security(m, &cfg.objects)?;
        }
        if self.serials.len() > 1 {
            return Err(CliError::new(
                "-serial",
                "",
                "moat emulates one serial port (COM1); give -serial once",
            ));
        }
        cfg.serial = match self.serials.pop() {
            Some(s) => s,
            None if self.nodefaults => None,
            None => Some(SerialBackend::Stdio),
        };
        if cfg.kernel.is_none() {
            if cfg.initrd.is_some() {
                return Err(CliError::new(
                    "-initrd",
                    "",
                    "-initrd only allowed with -kernel option",
                ));
            }
            if !cfg.append.is_empty() {
                return Err(CliError::new(
                    "-append",
                    "",
                    "-append only allowed with -kernel option",
                ));
            }
        }
        Ok(self.cfg)
    }
}

fn parse_cpu(opt: &str, arg: &str) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("model"))?;
    match kv.take("model").as_deref() {
        Some("host") | Some("max") => {}
        Some(m) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("unsupported CPU model '{m}' (moat offers 'host')"),
            ))
        }
        None => return Err(CliError::new(opt, arg, "a CPU model is required")),
    }
    kv.finish(opt, arg)
}

fn parse_display(opt: &str, arg: &str) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("type"))?;
    match kv.take("type").as_deref() {
        Some("none") => {}
        _ => {
            return Err(CliError::new(
                opt,
                arg,
                "moat has no display; only 'none' is accepted",
            ))
        }
    }
    kv.finish(opt, arg)
}

fn parse_name(opt: &str, arg: &str, cfg: &mut VmConfig) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("guest"))?;
    cfg.name = kv.take("guest");
    if let Some(v) = kv.take("debug-threads") {
        keyval::parse_bool(opt, "debug-threads", &v)?;
    }
    cfg.process_name = kv.take("process");
    kv.finish(opt, arg)
}

fn parse_run_with(opt: &str, arg: &str, cfg: &mut VmConfig) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, None)?;
    if let Some(u) = kv.take("user") {
        cfg.run_as = Some(parse_run_as(opt, arg, &u)?);
    }
    if let Some(c) = kv.take("chroot") {
        cfg.chroot = Some(nonempty_path(opt, &c)?);
    }
    if let Some(v) = kv.take("async-teardown") {
        keyval::parse_bool(opt, "async-teardown", &v)?;
    }
    kv.finish(opt, arg)
}

fn nonempty_path(opt: &str, arg: &str) -> Result<PathBuf, CliError> {
    if arg.is_empty() {
        return Err(CliError::new(opt, arg, "empty file name"));
    }
    Ok(PathBuf::from(arg))
}

fn parse_machine(opt: &str, arg: &str, cfg: &mut VmConfig) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("type"))?;
    match kv.take("type").as_deref() {
        None | Some("microvm") => {}
        Some("help") | Some("?") => {
            return Err(CliError::new(
                opt,
                arg,
                "supported machines: microvm (the default)",
            ))
        }
        Some(t) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("unsupported machine type '{t}' (moat offers 'microvm')"),
            ))
        }
    }
    if let Some(v) = kv.take("acpi") {
        cfg.acpi = match v.as_str() {
            "auto" => true,
            _ => keyval::parse_bool(opt, "acpi", &v)?,
        };
    }
    if let Some(v) = kv.take("accel") {
        check_accel(opt, arg, &v)?;
    }
    if let Some(v) = kv.take("thp") {
        cfg.thp = keyval::parse_bool(opt, "thp", &v)?;
    }
    // QEMU microvm's optional legacy devices: moat's microvm always has them.
    for dev in ["rtc", "pit", "pic", "isa-serial"] {
        if let Some(v) = kv.take(dev) {
            if v != "auto" && !keyval::parse_bool(opt, dev, &v)? {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("{dev}=off is not supported: moat's microvm always has this device"),
                ));
            }
        }
    }
    kv.finish(opt, arg)
}

const TCG_REFUSED: &str = "TCG emulation is not offered: it runs guest code in the VMM process \
with no hardware isolation, so it is unfit for untrusted guests; use KVM (-accel kvm)";

fn check_accel(opt: &str, arg: &str, accel: &str) -> Result<(), CliError> {
    match accel {
        "kvm" => Ok(()),
        "tcg" => Err(CliError::new(opt, arg, TCG_REFUSED)),
        other => Err(CliError::new(
            opt,
            arg,
            &format!("unsupported accelerator '{other}' (moat offers 'kvm')"),
        )),
    }
}

fn parse_accel(opt: &str, arg: &str) -> Result<(), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("accel"))?;
    let accel = kv
        .take("accel")
        .ok_or_else(|| CliError::new(opt, arg, "an accelerator name is required"))?;
    // QEMU allows a ':'-separated fallback list (`kvm:tcg`); each must be acceptable.
    for a in accel.split(':') {
        check_accel(opt, arg, a)?;
    }
    // The in-kernel irqchip is the only one moat has.
    match kv.take("kernel-irqchip").as_deref() {
        None | Some("on") | Some("true") | Some("yes") => {}
        Some(v) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!(
                    "kernel-irqchip={v} is not supported (moat always uses the in-kernel irqchip)"
                ),
            ))
        }
    }
    kv.finish(opt, arg)
}

fn parse_mem(opt: &str, arg: &str) -> Result<u64, CliError> {
    let mut kv = keyval::parse(opt, arg, Some("size"))?;
    let size = match kv.take("size") {
        Some(s) => keyval::parse_size(opt, &s, 1 << 20)?,
        None => return Err(CliError::new(opt, arg, "missing 'size' parameter")),
    };
    kv.finish(opt, arg)?;
    if size < MIN_RAM {
        return Err(CliError::new(
            opt,
            arg,
            &format!("RAM size too small (at least {} MiB)", MIN_RAM >> 20),
        ));
    }
    if size > MAX_RAM {
        return Err(CliError::new(
            opt,
            arg,
            &format!("RAM size too large (at most {} GiB)", MAX_RAM >> 30),
        ));
    }
    // QEMU rounds RAM up to its page granularity (8 KiB on x86).
    Ok(size.div_ceil(8192) * 8192)
}

fn parse_smp(opt: &str, arg: &str) -> Result<Topology, CliError> {
    let mut kv = keyval::parse(opt, arg, Some("cpus"))?;
    let mut get = |k: &str| -> Result<Option<u32>, CliError> {
        match kv.take(k) {
            None => Ok(None),
            Some(v) => {
                let n = keyval::parse_u64(opt, k, &v)?;
                let n = u32::try_from(n)
                    .map_err(|_| CliError::new(opt, arg, &format!("'{k}' is too large")))?;
                // QEMU treats 0 as "not given".
                Ok(if n == 0 { None } else { Some(n) })
            }
        }
    };
    let cpus = get("cpus")?;
    let sockets = get("sockets")?;
    let dies = get("dies")?;
    let cores = get("cores")?;
    let threads = get("threads")?;
    let maxcpus = get("maxcpus")?;
    kv.finish(opt, arg)?;
    let dies = dies.unwrap_or(1);
    // QEMU >= 6.2 prefers cores over sockets when the topology is incomplete.
    let threads = threads.unwrap_or(1);
    let given_max = maxcpus.or(cpus).unwrap_or(1);
    let (sockets, cores) = match (sockets, cores) {
        (Some(s), Some(c)) => (s, c),
        (Some(s), None) => (s, given_max.div_ceil(s * dies * threads).max(1)),
        (None, Some(c)) => (given_max.div_ceil(c * dies * threads).max(1), c),
        (None, None) => (1, given_max.div_ceil(dies * threads).max(1)),
    };
    let product = u64::from(sockets) * u64::from(dies) * u64::from(cores) * u64::from(threads);
    let maxcpus = match maxcpus {
        Some(m) => u64::from(m),
        None => product,
    };
    let cpus = u64::from(cpus.unwrap_or(u32::try_from(maxcpus).unwrap_or(u32::MAX)));
    if product != maxcpus {
        return Err(CliError::new(
            opt,
            arg,
            &format!(
                "Invalid CPU topology: product of the hierarchy must match maxcpus: \
                 sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads}) != maxcpus ({maxcpus})"
            ),
        ));
    }
    if cpus > maxcpus {
        return Err(CliError::new(
            opt,
            arg,
            &format!(
                "Invalid CPU topology: maxcpus must be equal to or greater than smp: \
                 sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads}) == maxcpus ({maxcpus}) < smp_cpus ({cpus})"
            ),
        ));
    }
    if cpus != maxcpus {
        return Err(CliError::new(
            opt,
            arg,
            "CPU hotplug is not supported: maxcpus must equal cpus",
        ));
    }
    if maxcpus > u64::from(MAX_CPUS) {
        return Err(CliError::new(
            opt,
            arg,
            &format!(
                "Invalid SMP CPUs {maxcpus}. The max CPUs supported by machine 'microvm' is {MAX_CPUS}"
            ),
        ));
    }
    let cpus = u32::try_from(cpus).unwrap_or(MAX_CPUS);
    Ok(Topology {
        cpus,
        sockets,
        dies,
        cores,
        threads,
    })
}

fn parse_serial(opt: &str, arg: &str) -> Result<Option<SerialBackend>, CliError> {
    let (kind, rest) = arg.split_once(':').unwrap_or((arg, ""));
    let backend = match kind {
        "stdio" | "mon:stdio" if rest.is_empty() => SerialBackend::Stdio,
        "mon" if rest == "stdio" => SerialBackend::Stdio,
        "null" if rest.is_empty() => SerialBackend::Null,
        "none" if rest.is_empty() => return Ok(None),
        "file" => SerialBackend::File(nonempty_path(opt, rest)?),
        "unix" => {
            let c = legacy_socket(opt, arg)?;
            let SocketAddr::Unix(path) = c.addr else {
                unreachable!("unix: gives a UNIX socket")
            };
            SerialBackend::UnixServer { path, wait: c.wait }
        }
        _ => {
            return Err(CliError::new(
                opt,
                arg,
                "unsupported serial backend (moat offers stdio, null, none, file:PATH, unix:PATH,server=on[,wait=off])",
            ))
        }
    };
    Ok(Some(backend))
}

/// `-drive file=...,format=raw,if=virtio|none,...`; true when it makes a device itself.
/// `-drive if=none,id=ID` without a file: a drive with no medium, as QEMU
/// keeps one (its id; `None` for a drive with a file). Of the other keys
/// only those that make sense without an image are taken.
fn parse_empty_drive(opt: &str, arg: &str) -> Result<Option<String>, CliError> {
    let mut kv = keyval::parse(opt, arg, None)?;
    if kv.take("file").is_some_and(|f| !f.is_empty()) || kv.take("if").as_deref() != Some("none") {
        return Ok(None);
    }
    if let Some(v) = kv.take("readonly") {
        keyval::parse_bool(opt, "readonly", &v)?;
    }
    on_error(opt, arg, &mut kv, false)?;
    on_error(opt, arg, &mut kv, true)?;
    match kv.take("media").as_deref() {
        None | Some("disk") | Some("cdrom") => {}
        Some(m) => return Err(CliError::new(opt, arg, &format!("'{m}' invalid media"))),
    }
    // (QEMU's words: these need an image.)
    if kv.take("format").is_some() {
        return Err(CliError::new(
            opt,
            arg,
            "A block device must be specified for \"file\"",
        ));
    }
    if kv.take("cache").is_some() {
        return Err(CliError::new(
            opt,
            arg,
            "Must specify either driver or file",
        ));
    }
    let id = kv
        .take("id")
        .ok_or_else(|| CliError::new(opt, arg, "if=none needs an id= for -device to use"))?;
    kv.finish(opt, arg)?;
    Ok(Some(id))
}

fn parse_drive(opt: &str, arg: &str) -> Result<(DriveConfig, bool), CliError> {
    let mut kv = keyval::parse(opt, arg, None)?;
    let file = kv
        .take("file")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| CliError::new(opt, arg, "Parameter 'file' is missing"))?;
    let read_only = match kv.take("readonly") {
        Some(v) => keyval::parse_bool(opt, "readonly", &v)?,
        None => false,
    };
    let format = match kv.take("format") {
        Some(f) => parse_format(opt, arg, "format", &f)?,
        // Probing lets a guest that wrote an image header into its disk choose
        // how the host opens it next time: never for a writable drive.
        None if !read_only => {
            return Err(CliError::new(
                opt,
                arg,
                "a writable drive needs format= (moat never probes the format of an image the guest can write)",
            ))
        }
        None => DriveFormat::Raw,
    };
    let virtio = match kv.take("if").as_deref() {
        None | Some("virtio") => true,
        Some("none") => false,
        Some(i) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("unsupported interface if={i} (moat offers virtio and none)"),
            ))
        }
    };
    let cache = match kv.take("cache").as_deref() {
        None | Some("writeback") => CacheMode::Writeback,
        Some("none") => CacheMode::None,
        Some("writethrough") => CacheMode::Writethrough,
        Some("directsync") => CacheMode::Directsync,
        Some("unsafe") => CacheMode::Unsafe,
        Some(c) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("invalid cache option '{c}'"),
            ))
        }
    };
    let discard_unmap = match kv.take("discard").as_deref() {
        None | Some("ignore") | Some("off") => false,
        Some("unmap") | Some("on") => true,
        Some(d) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("invalid discard option '{d}'"),
            ))
        }
    };
    let werror = on_error(opt, arg, &mut kv, false)?.unwrap_or(moat_config::WERROR_DEFAULT);
    let rerror = on_error(opt, arg, &mut kv, true)?.unwrap_or(moat_config::RERROR_DEFAULT);
    let id = kv.take("id");
    let serial = kv.take("serial");
    if let Some(m) = kv.take("media") {
        if m != "disk" {
            return Err(CliError::new(opt, arg, "only media=disk is supported"));
        }
    }
    let top = parse_layers(opt, arg, &mut kv, &file, format)?;
    let throttle = parse_throttle(opt, arg, &mut kv)?;
    kv.finish(opt, arg)?;
    if !virtio && id.is_none() {
        return Err(CliError::new(
            opt,
            arg,
            "if=none needs an id= for -device to use",
        ));
    }
    Ok((
        DriveConfig {
            id,
            qdev: None,
            index: 0,
            file: top.file,
            format,
            backing: top.backing,
            data_file: top.data_file,
            throttle,
            read_only,
            cache,
            discard_unmap,
            serial,
            werror,
            rerror,
            num_queues: 1,
        },
        virtio,
    ))
}

/// `werror=` (`read`: `rerror=`), QEMU's values and message.
fn on_error(
    opt: &str,
    arg: &str,
    kv: &mut keyval::KeyVals,
    read: bool,
) -> Result<Option<moat_config::OnError>, CliError> {
    let key = if read { "rerror" } else { "werror" };
    kv.take(key)
        .map(|v| {
            moat_config::OnError::parse(&v, read).ok_or_else(|| {
                let what = if read { "read" } else { "write" };
                CliError::new(opt, arg, &format!("'{v}' invalid {what} error action"))
            })
        })
        .transpose()
}

fn parse_format(opt: &str, arg: &str, key: &str, f: &str) -> Result<DriveFormat, CliError> {
    match f {
        "raw" => Ok(DriveFormat::Raw),
        "qcow2" => Ok(DriveFormat::Qcow2),
        f => Err(CliError::new(
            opt,
            arg,
            &format!("{key}: unsupported format '{f}' (moat reads raw and qcow2)"),
        )),
    }
}

/// What -drive's dotted keys name below the image (`backing.*`,
/// `data-file.*`), as QEMU's block node tree with -drive's shorthands made
/// explicit: `X.file=F` and `data-file=F` are files (`{"driver": "file",
/// "filename": F}`), a file node's driver defaults to `file`, and
/// `backing=` (or `null`) means no backing image. The tree then goes
/// through the parser `blockdev-add` uses ([`moat_block::node`]).
fn parse_layers(
    opt: &str,
    arg: &str,
    kv: &mut keyval::KeyVals,
    file: &str,
    format: DriveFormat,
) -> Result<ImageLayer, CliError> {
    use serde_json::{json, Map, Value};
    fn normalize(tree: &mut Map<String, Value>) {
        for (k, v) in tree.iter_mut() {
            match (k.as_str(), &mut *v) {
                ("file" | "data-file", Value::String(f)) => {
                    *v = json!({"driver": "file", "filename": f.clone()});
                }
                ("file" | "data-file", Value::Object(m)) => {
                    m.entry("driver").or_insert_with(|| json!("file"));
                }
                ("backing", Value::String(b)) if b.is_empty() || b == "null" => *v = Value::Null,
                (_, Value::Object(m)) => normalize(m),
                _ => {}
            }
        }
    }
    let mut tree = kv
        .take_tree(&["backing", "data-file"])
        .map_err(|e| CliError::new(opt, arg, &e))?;
    tree.insert("driver".into(), json!(format.name()));
    tree.insert("file".into(), json!({"driver": "file", "filename": file}));
    normalize(&mut tree);
    moat_block::node::layer("", &tree, 0).map_err(|e| CliError::new(opt, arg, &e))
}

/// `throttling.*` keys (QEMU's -drive names) into limits, validated as QEMU does.
fn parse_throttle(
    opt: &str,
    arg: &str,
    kv: &mut keyval::KeyVals,
) -> Result<ThrottleLimits, CliError> {
    let mut t = ThrottleLimits::default();
    for (name, _, field) in t.fields_mut() {
        let key = format!("throttling.{name}");
        if let Some(v) = kv.take(&key) {
            *field = keyval::parse_u64(opt, &key, &v)?;
        }
    }
    if let Some(g) = kv.take("throttling.group") {
        return Err(CliError::new(
            opt,
            arg,
            &format!("throttling.group={g}: throttle groups are not supported (each drive has its own limits)"),
        ));
    }
    t.validate().map_err(|e| CliError::new(opt, arg, &e))?;
    Ok(t)
}

/// `-sandbox on|off[,obsolete=deny][,elevateprivileges=deny][,spawn=deny][,resourcecontrol=deny]`.
/// moat's filter denies all four of QEMU's groups whatever is asked, so
/// `allow` (or `children`) is refused rather than silently not done.
fn parse_sandbox(opt: &str, arg: &str) -> Result<(bool, bool), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("enable"))?;
    let on = match kv.take("enable") {
        Some(v) => keyval::parse_bool(opt, "enable", &v)?,
        None => return Err(CliError::new(opt, arg, "Parameter 'enable' is missing")),
    };
    for key in ["obsolete", "elevateprivileges", "spawn", "resourcecontrol"] {
        match kv.take(key).as_deref() {
            None | Some("deny") => {}
            Some(v @ ("allow" | "children")) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!(
                        "{key}={v}: moat's sandbox always denies {key} (only deny is supported)"
                    ),
                ))
            }
            Some(v) => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("invalid argument for {key}: '{v}'"),
                ))
            }
        }
    }
    let landlock_required = match kv.take("landlock").as_deref() {
        None | Some("best-effort") => false,
        Some("required") => true,
        Some(v) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("invalid argument for landlock: '{v}' (required or best-effort)"),
            ))
        }
    };
    kv.finish(opt, arg)?;
    Ok((on, landlock_required))
}

/// `user=USER|UID:GID`: a name is looked up when moat starts.
fn parse_run_as(opt: &str, arg: &str, v: &str) -> Result<RunAs, CliError> {
    if v.is_empty() {
        return Err(CliError::new(opt, arg, "user name is empty"));
    }
    if let Some((u, g)) = v.split_once(':') {
        return match (u.parse::<u32>(), g.parse::<u32>()) {
            (Ok(u), Ok(g)) => Ok(RunAs::Ids(u, g)),
            _ => Err(CliError::new(
                opt,
                arg,
                &format!("invalid user '{v}' (UID:GID must be numbers)"),
            )),
        };
    }
    Ok(RunAs::User(v.to_string()))
}

/// `-add-fd fd=N,set=S[,opaque=STR]`, with QEMU's messages.
fn parse_add_fd(opt: &str, arg: &str) -> Result<AddFd, CliError> {
    let mut kv = keyval::parse(opt, arg, None)?;
    let num = |kv: &mut keyval::KeyVals, key: &str, missing: &str| -> Result<i64, CliError> {
        match kv.take(key) {
            None => Err(CliError::new(opt, arg, missing)),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| CliError::new(opt, arg, missing)),
        }
    };
    let fd = num(
        &mut kv,
        "fd",
        "fd option is required and must be non-negative",
    )?;
    if fd <= 2 {
        return Err(CliError::new(
            opt,
            arg,
            "fd cannot be a standard I/O stream",
        ));
    }
    let set = num(
        &mut kv,
        "set",
        "set option is required and must be non-negative",
    )?;
    let opaque = kv.take("opaque");
    kv.finish(opt, arg)?;
    Ok(AddFd { fd, set, opaque })
}

fn parse_uuid(opt: &str, arg: &str) -> Result<String, CliError> {
    let ok = arg.len() == 36
        && arg.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !ok {
        return Err(CliError::new(opt, arg, "Fail to parse UUID string"));
    }
    Ok(arg.to_ascii_lowercase())
}

/// The options shared by socket chardevs, from keyval pairs.
fn socket_options(
    opt: &str,
    arg: &str,
    kv: &mut keyval::KeyVals,
    addr: SocketAddr,
) -> Result<SocketChardev, CliError> {
    let server = match kv.take("server") {
        Some(v) => keyval::parse_bool(opt, "server", &v)?,
        None => false,
    };
    let wait = match kv.take("wait") {
        Some(v) => keyval::parse_bool(opt, "wait", &v)?,
        None => true,
    };
    for k in ["ipv4", "ipv6", "nodelay"] {
        if let Some(v) = kv.take(k) {
            keyval::parse_bool(opt, k, &v)?;
        }
    }
    let tls_creds = kv.take("tls-creds");
    let tls_authz = kv.take("tls-authz");
    if !server {
        return Err(CliError::new(
            opt,
            arg,
            "only listening sockets are supported (add server=on)",
        ));
    }
    if !matches!(addr, SocketAddr::Tcp { .. }) && (tls_creds.is_some() || tls_authz.is_some()) {
        return Err(CliError::new(opt, arg, "TLS is only for TCP sockets"));
    }
    Ok(SocketChardev {
        addr,
        wait,
        tls_creds,
        tls_authz,
    })
}

/// QEMU's legacy bare flags: `server`, `nowait`, `wait`.
fn legacy_flags(rest: &str) -> String {
    rest.split(',')
        .map(|e| match e {
            "server" => "server=on",
            "nowait" => "wait=off",
            "wait" => "wait=on",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_port(opt: &str, arg: &str, p: &str) -> Result<u16, CliError> {
    p.parse::<u16>()
        .map_err(|_| CliError::new(opt, arg, &format!("invalid port '{p}'")))
}

/// The legacy socket syntax of `-qmp`/`-monitor`/`-serial`: `unix:PATH,...`, `tcp:HOST:PORT,...`.
fn legacy_socket(opt: &str, arg: &str) -> Result<SocketChardev, CliError> {
    if let Some(rest) = arg.strip_prefix("unix:") {
        let mut kv = keyval::parse(opt, &legacy_flags(rest), Some("path"))?;
        let path = kv
            .take("path")
            .filter(|p| !p.is_empty())
            .ok_or_else(|| CliError::new(opt, arg, "a socket path is required"))?;
        let c = socket_options(opt, arg, &mut kv, SocketAddr::Unix(PathBuf::from(path)))?;
        kv.finish(opt, arg)?;
        Ok(c)
    } else if let Some(rest) = arg.strip_prefix("tcp:") {
        let mut kv = keyval::parse(opt, &legacy_flags(rest), Some("addr"))?;
        let addr = kv.take("addr").unwrap_or_default();
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| CliError::new(opt, arg, "expected tcp:HOST:PORT"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = parse_port(opt, arg, port)?;
        let c = socket_options(opt, arg, &mut kv, SocketAddr::Tcp { host, port })?;
        kv.finish(opt, arg)?;
        Ok(c)
    } else {
        Err(CliError::new(
            opt,
            arg,
            "unsupported monitor backend (moat offers unix:PATH,server=on[,wait=off] and tcp:HOST:PORT with TLS)",
        ))
    }
}

/// `-chardev socket,id=ID,path=...|host=...,port=...,server=on,...`.
fn parse_chardev(opt: &str, arg: &str) -> Result<(String, SocketChardev), CliError> {
    let mut kv = keyval::parse(opt, arg, Some("backend"))?;
    match kv.take("backend").as_deref() {
        Some("socket") => {}
        Some(b) => {
            return Err(CliError::new(
                opt,
                arg,
                &format!("unsupported chardev backend '{b}' (moat offers 'socket')"),
            ))
        }
        None => return Err(CliError::new(opt, arg, "a chardev backend is required")),
    }
    let id = kv
        .take("id")
        .filter(|i| !i.is_empty())
        .ok_or_else(|| CliError::new(opt, arg, "Parameter 'id' is missing"))?;
    let addr = match (
        kv.take("path"),
        kv.take("host"),
        kv.take("port"),
        kv.take("fd"),
    ) {
        (Some(p), None, None, None) if !p.is_empty() => SocketAddr::Unix(PathBuf::from(p)),
        (None, host, Some(port), None) => SocketAddr::Tcp {
            host: host.unwrap_or_else(|| "0.0.0.0".into()),
            port: parse_port(opt, arg, &port)?,
        },
        (None, None, None, Some(fd)) => match fd.parse::<i32>() {
            Ok(n) if n >= 0 => SocketAddr::Fd(n),
            _ => {
                return Err(CliError::new(
                    opt,
                    arg,
                    &format!("fd={fd}: expected the number of an inherited descriptor"),
                ))
            }
        },
        _ => {
            return Err(CliError::new(
                opt,
                arg,
                "give one of path=, port= (with host=), or fd=",
            ))
        }
    };
    let c = socket_options(opt, arg, &mut kv, addr)?;
    kv.finish(opt, arg)?;
    Ok((id, c))
}

/// A TCP monitor is refused unless it has TLS with client certificates and
/// an authorization policy.
fn check_monitor_security(m: &MonitorConfig, objects: &[Object]) -> Result<(), CliError> {
    let SocketAddr::Tcp { host, port } = &m.socket.addr else {
        return Ok(());
    };
    let opt = if m.mode == MonitorMode::Control {
        "-qmp"
    } else {
        "-monitor"
    };
    let arg = format!("tcp:{host}:{port}");
    let (Some(creds), Some(authz)) = (&m.socket.tls_creds, &m.socket.tls_authz) else {
        return Err(CliError::new(
            opt,
            &arg,
            "a monitor on TCP needs tls-creds= (x509, verify-peer=on) and tls-authz=; \
             plaintext TCP monitors do not exist in moat (use a UNIX socket)",
        ));
    };
    match objects.iter().find(|o| o.id() == creds) {
        Some(Object::TlsCredsX509 { verify_peer: true, .. }) => {}
        Some(Object::TlsCredsX509 { .. }) => {
            return Err(CliError::new(
                opt,
                &arg,
                &format!("tls-creds '{creds}' must have verify-peer=on: monitor clients must present a certificate"),
            ))
        }
        _ => return Err(CliError::new(opt, &arg, &format!("no tls-creds-x509 object with id '{creds}'"))),
    }
    match objects.iter().find(|o| o.id() == authz) {
        Some(Object::AuthzSimple { .. }) | Some(Object::AuthzList { .. }) => Ok(()),
        _ => Err(CliError::new(
            opt,
            &arg,
            &format!("no authz-simple or authz-list object with id '{authz}'"),
        )),
    }
}

fn policy(opt: &str, arg: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "allow" => Ok(true),
        "deny" => Ok(false),
        _ => Err(CliError::new(
            opt,
            arg,
            &format!("invalid policy '{v}' (allow or deny)"),
        )),
    }
}

/// `-object TYPE,id=ID,...` (keyval, with `rules.N.key=` for lists) or
/// QEMU's JSON form `{"qom-type": TYPE, "id": ID, ...}`.
fn parse_object(opt: &str, arg: &str) -> Result<Object, CliError> {
    let mut props: Vec<(String, serde_json::Value)> = Vec::new();
    if arg.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(arg)
            .map_err(|e| CliError::new(opt, arg, &format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(m) = v else {
            return Err(CliError::new(opt, arg, "expected a JSON object"));
        };
        props.extend(m);
    } else {
        let mut kv = keyval::parse(opt, arg, Some("qom-type"))?;
        let mut rules: Vec<serde_json::Map<String, serde_json::Value>> = Vec::new();
        while let Some((k, v)) = kv.pop() {
            if let Some(rest) = k.strip_prefix("rules.") {
                let (idx, key) = rest
                    .split_once('.')
                    .ok_or_else(|| CliError::new(opt, arg, &format!("Invalid parameter '{k}'")))?;
                let idx: usize =
                    idx.parse().ok().filter(|&i| i < 1024).ok_or_else(|| {
                        CliError::new(opt, arg, &format!("Invalid parameter '{k}'"))
                    })?;
                if rules.len() <= idx {
                    rules.resize(idx + 1, serde_json::Map::new());
                }
                rules[idx].insert(key.to_string(), serde_json::Value::String(v));
            } else {
                props.push((k, serde_json::Value::String(v)));
            }
        }
        if !rules.is_empty() {
            props.push((
                "rules".into(),
                serde_json::Value::Array(
                    rules.into_iter().map(serde_json::Value::Object).collect(),
                ),
            ));
        }
    }
    let mut take = |k: &str| -> Option<serde_json::Value> {
        let i = props.iter().position(|(n, _)| n == k)?;
        Some(props.remove(i).1)
    };
    let text = |v: Option<serde_json::Value>, k: &str| -> Result<Option<String>, CliError> {
        match v {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(serde_json::Value::Bool(b)) => {
                Ok(Some(if b { "on".into() } else { "off".into() }))
            }
            Some(_) => Err(CliError::new(
                opt,
                arg,
                &format!("Parameter '{k}' expects a string"),
            )),
        }
    };
    let qom_type = text(take("qom-type"), "qom-type")?
        .ok_or_else(|| CliError::new(opt, arg, "Parameter 'qom-type' is missing"))?;
    let id = text(take("id"), "id")?
        .filter(|i| !i.is_empty())
        .ok_or_else(|| CliError::new(opt, arg, "Parameter 'id' is missing"))?;
    keyval::check_id(opt, arg, &id)?;
    let obj = match qom_type.as_str() {
        "tls-creds-x509" => {
            let dir = text(take("dir"), "dir")?.ok_or_else(|| CliError::new(opt, arg, "Parameter 'dir' is missing"))?;
            match text(take("endpoint"), "endpoint")?.as_deref() {
                None | Some("server") => {}
                Some(e) => return Err(CliError::new(opt, arg, &format!("endpoint '{e}': moat only serves (endpoint=server)"))),
            }
            let verify_peer = match text(take("verify-peer"), "verify-peer")? {
                Some(v) => keyval::parse_bool(opt, "verify-peer", &v)?,
                None => true,
            };
            Object::TlsCredsX509 { id, dir: PathBuf::from(dir), verify_peer }
        }
        "authz-simple" => {
            let identity = text(take("identity"), "identity")?.ok_or_else(|| CliError::new(opt, arg, "Parameter 'identity' is missing"))?;
            Object::AuthzSimple { id, identity }
        }
        "authz-list" => {
            let default_allow = match text(take("policy"), "policy")? {
                Some(p) => policy(opt, arg, &p)?,
                None => false,
            };
            let mut rules = Vec::new();
            match take("rules") {
                None => {}
                Some(serde_json::Value::Array(list)) => {
                    for r in list {
                        let serde_json::Value::Object(mut r) = r else {
                            return Err(CliError::new(opt, arg, "each rule must be an object"));
                        };
                        let get = |r: &mut serde_json::Map<String, serde_json::Value>, k: &str| match r.remove(k) {
                            None => Ok(None),
                            Some(serde_json::Value::String(s)) => Ok(Some(s)),
                            Some(_) => Err(CliError::new(opt, arg, &format!("rule member '{k}' must be a string"))),
                        };
                        let pattern = get(&mut r, "match")?.ok_or_else(|| CliError::new(opt, arg, "a rule lacks 'match'"))?;
                        let allow = policy(opt, arg, &get(&mut r, "policy")?.ok_or_else(|| CliError::new(opt, arg, "a rule lacks 'policy'"))?)?;
                        let format = match get(&mut r, "format")?.as_deref() {
                            None | Some("exact") => MatchFormat::Exact,
                            Some("glob") => MatchFormat::Glob,
                            Some(f) => return Err(CliError::new(opt, arg, &format!("invalid rule format '{f}' (exact or glob)"))),
                        };
                        if let Some(k) = r.keys().next() {
                            return Err(CliError::new(opt, arg, &format!("unknown rule member '{k}'")));
                        }
                        rules.push(AuthzRule { pattern, allow, format });
                    }
                }
                Some(_) => return Err(CliError::new(opt, arg, "'rules' must be a list")),
            }
            Object::AuthzList { id, default_allow, rules }
        }
        "rng-random" => {
            // QEMU's default file; moat reads only the kernel's two
            // random devices (any other file would leak into the guest).
            let filename = text(take("filename"), "filename")?.unwrap_or_else(|| moat_config::RNG_DEVICES[0].into());
            if !moat_config::RNG_DEVICES.contains(&filename.as_str()) {
                return Err(CliError::new(opt, arg, &format!("rng-random: filename '{filename}' refused: moat reads only /dev/urandom or /dev/random (any other file would leak into the guest)")));
            }
            Object::Rng { id, source: RngSource::Device(PathBuf::from(filename)) }
        }
        "rng-builtin" => Object::Rng { id, source: RngSource::Builtin },
        "rng-egd" => return Err(CliError::new(opt, arg, "rng-egd connects to an entropy daemon, which moat does not do (use rng-builtin or rng-random)")),
        t => return Err(CliError::new(opt, arg, &format!("unsupported object type '{t}' (moat offers tls-creds-x509, authz-simple, authz-list, rng-random, rng-builtin)"))),
    };
    if let Some((k, _)) = props.first() {
        return Err(CliError::new(opt, arg, &format!("Invalid parameter '{k}'")));
    }
    Ok(obj)
}

/// The text of `-h`.
pub const HELP: &str = "\
usage: moat [options]
A virtual machine monitor for KVM that speaks a subset of qemu-system-x86_64's command line.
With no -kernel, moat boots its built-in demo guest.

-M|-machine microvm[,acpi=on|off][,thp=on|off][,rtc=on][,pit=on][,pic=on][,isa-serial=on]
                                    the machine (microvm is the only one); thp=off keeps
                                    guest RAM off transparent huge pages (less RSS, slower
                                    guest; default on, as QEMU)
-accel kvm | -enable-kvm            KVM acceleration (tcg is refused: it gives no isolation)
-cpu host                           expose the host CPU
-m SIZE                             guest RAM (default 128M; suffixes K M G T, default M)
-smp N[,cpus=N][,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=N]   vCPUs (1..64)
-kernel FILE                        bzImage, or ELF vmlinux (PVH note or 64-bit entry)
-initrd FILE                        initial ramdisk
-append CMDLINE                     kernel command line
-serial stdio|null|none|file:PATH|unix:PATH,server=on[,wait=off]   COM1 backend (default stdio)
-nographic, -display none           accepted (moat has no display)
-nodefaults                         no default serial port
-no-reboot                          exit instead of rebooting when the guest resets
-S                                  do not start the vCPUs
-name NAME                          the VM's name
-uuid UUID                          the VM's UUID
-drive file=F,format=raw|qcow2[,if=virtio|none][,id=][,readonly=on][,cache=][,discard=unmap|ignore][,serial=]
       [,backing.driver=,backing.file.filename=[,backing.backing...]|,backing=][,data-file.filename=]
       [,throttling.bps-total|bps-read|bps-write|iops-total|iops-read|iops-write[-max[-length]]=N][,throttling.iops-size=]
-device virtio-blk-device,drive=ID[,serial=]   a virtio-blk disk for an if=none drive
-add-fd fd=N,set=S[,opaque=]   put inherited descriptor N in fd set S (use as /dev/fdset/S)
-sandbox on|off[,obsolete=deny,...][,landlock=required]  seccomp + Landlock (on by default)
-run-with user=USER|UID:GID[,chroot=DIR]   drop to that user (and root) once set up
-qmp unix:PATH,server=on[,wait=off] a QMP monitor (socket created mode 0600)
-monitor unix:PATH,server=on[,wait=off]   an HMP monitor
-chardev socket,id=ID,path=PATH,server=on[,wait=off]  with  -mon chardev=ID[,mode=control|readline]
                                    TCP monitors only with tls-creds= and tls-authz=
-pidfile FILE                       write the process id to FILE
-version                            print the version
-h|-help                            print this help
";

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> VmConfig {
        match parse_args(args).unwrap() {
            Action::Run(c) => *c,
            a => panic!("unexpected {a:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        parse_args(args).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]);
        assert_eq!(c, VmConfig::default());
    }

    #[test]
    fn full_command_line() {
        let c = cfg(&[
            "-M",
            "microvm,acpi=off",
            "--enable-kvm",
            "-cpu",
            "host",
            "-m",
            "512M",
            "-smp",
            "2",
            "-kernel",
            "/k",
            "-initrd",
            "/i",
            "-append",
            "console=ttyS0",
            "-nographic",
            "-no-reboot",
            "-serial",
            "file:/tmp/x,,y",
            "--name",
            "vm1",
            "-S",
        ]);
        assert!(!c.acpi);
        assert_eq!(c.mem_size, 512 << 20);
        assert_eq!(c.smp.cpus, 2);
        assert_eq!(c.smp.cores, 2);
        assert_eq!(c.kernel, Some(PathBuf::from("/k")));
        assert_eq!(c.append, "console=ttyS0");
        assert!(c.no_reboot && c.start_paused);
        assert_eq!(c.name.as_deref(), Some("vm1"));
        // file: is not keyval; the path is taken verbatim.
        assert_eq!(
            c.serial,
            Some(SerialBackend::File(PathBuf::from("/tmp/x,,y")))
        );
    }

    #[test]
    fn smp_topologies() {
        let t = cfg(&["-smp", "cpus=8,sockets=2,threads=2"]).smp;
        assert_eq!((t.sockets, t.cores, t.threads), (2, 2, 2));
        let t = cfg(&["-smp", "sockets=2,cores=3"]).smp;
        assert_eq!(t.cpus, 6);
        assert!(err(&["-smp", "65"]).contains("max CPUs"));
        assert!(err(&["-smp", "cpus=4,sockets=3,cores=1"]).contains("Invalid CPU topology"));
        assert!(err(&["-smp", "2,maxcpus=4"]).contains("hotplug"));
        assert!(err(&["-smp", "two"]).contains("expects a number"));
        assert!(err(&["-smp", "2,foo=1"]).contains("'foo'"));
        assert_eq!(cfg(&["-smp", "64"]).smp.cpus, 64);
    }

    #[test]
    fn refusals_name_the_option() {
        assert!(err(&["-accel", "tcg"]).contains("no hardware isolation"));
        assert!(err(&["-accel", "kvm:tcg"]).contains("-accel"));
        assert!(err(&["-accel", "kvm,kernel-irqchip=split"]).contains("kernel-irqchip=split"));
        assert!(matches!(
            parse_args(&["-accel", "kvm,kernel-irqchip=on"]),
            Ok(Action::Run(_))
        ));
        assert_eq!(
            cfg(&["-name", "vm,process=p1"]).process_name.as_deref(),
            Some("p1")
        );
        assert!(err(&["-machine", "pc"]).starts_with("-machine pc: unsupported machine"));
        assert!(err(&["-M", "microvm,acpi=maybe"]).contains("'acpi'"));
        assert!(cfg(&["-M", "microvm"]).thp);
        assert!(cfg(&["-M", "microvm,thp=on"]).thp);
        assert!(!cfg(&["-M", "thp=off"]).thp);
        assert!(err(&["-M", "microvm,thp=2M"]).contains("'thp'"));
        assert!(err(&["-M", "microvm,foo=1"]).contains("'foo'"));
        assert!(err(&["-M", "microvm,rtc=off"]).contains("rtc=off"));
        assert!(cfg(&["-M", "microvm,rtc=on,pit=auto,pic=on,isa-serial=on"]).acpi);
        assert!(err(&["-bogus"]).starts_with("-bogus"));
        assert!(err(&["-m"]).contains("requires an argument"));
        assert!(err(&["-m", "1K"]).contains("too small"));
        assert!(err(&["-m", "5T"]).contains("too large"));
        assert!(err(&["-serial", "tcp:1.2.3.4:5"]).contains("unsupported serial"));
        assert!(err(&["-serial", "unix:/x"]).contains("server=on"));
        assert!(err(&["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"])
            .contains("plaintext TCP monitors do not exist"));
        assert!(err(&[
            "-chardev",
            "socket,id=c,host=::1,port=5,server=on",
            "-mon",
            "c"
        ])
        .contains("tls-creds"));
        assert!(err(&["-mon", "chardev=nope"]).contains("'nope' not found"));
        assert!(err(&["-uuid", "1234"]).contains("UUID"));
        let tcp = "socket,id=c,host=127.0.0.1,port=5,server=on,tls-creds=t,tls-authz=a";
        let creds = "tls-creds-x509,id=t,dir=/d,endpoint=server,verify-peer=on";
        assert!(err(&["-chardev", tcp, "-mon", "c"]).contains("no tls-creds-x509 object"));
        assert!(err(&[
            "-object",
            "tls-creds-x509,id=t,dir=/d,verify-peer=off",
            "-object",
            "authz-simple,id=a,identity=CN=x",
            "-chardev",
            tcp,
            "-mon",
            "c"
        ])
        .contains("verify-peer=on"));
        let c = cfg(&[
            "-object",
            creds,
            "-object",
            "authz-simple,id=a,identity=CN=x",
            "-chardev",
            tcp,
            "-mon",
            "c,mode=control",
        ]);
        assert_eq!(c.monitors.len(), 1);
        assert!(err(&["-object", "authz-simple,id=a"]).contains("identity"));
        assert!(err(&["-object", "secret,id=s,data=x"]).contains("unsupported object type"));
        assert!(err(&["-initrd", "/i"]).contains("-initrd only allowed with -kernel"));
        assert!(err(&["-display", "gtk"]).contains("-display"));
        assert!(err(&["-cpu", "qemu64"]).contains("-cpu"));
        assert!(err(&["stray"]).contains("not an option"));
    }

    #[test]
    fn serial_variants() {
        assert_eq!(cfg(&["-nodefaults"]).serial, None);
        assert_eq!(cfg(&["-serial", "none"]).serial, None);
        assert_eq!(cfg(&["-serial", "null"]).serial, Some(SerialBackend::Null));
        assert_eq!(
            cfg(&["-serial", "unix:/tmp/s,server=on,wait=off"]).serial,
            Some(SerialBackend::UnixServer {
                path: PathBuf::from("/tmp/s"),
                wait: false
            })
        );
        assert!(err(&["-serial", "null", "-serial", "stdio"]).contains("once"));
    }

    #[test]
    fn monitor_on_a_passed_socket() {
        let c = cfg(&[
            "-chardev",
            "socket,id=m0,fd=7,server=on,wait=off",
            "-mon",
            "chardev=m0",
        ]);
        assert_eq!(c.monitors[0].socket.addr, SocketAddr::Fd(7));
        assert!(err(&["-chardev", "socket,id=m0,fd=7,path=/x,server=on"]).contains("one of"));
        assert!(err(&["-chardev", "socket,id=m0,fd=-1,server=on"]).contains("inherited"));
    }

    #[test]
    fn monitors() {
        let c = cfg(&[
            "-qmp",
            "unix:/tmp/q.sock,server,nowait",
            "-chardev",
            "socket,id=m0,path=/tmp/h.sock,server=on,wait=off",
            "-mon",
            "chardev=m0,mode=readline",
            "-monitor",
            "unix:/tmp/m.sock,server=on,wait=on",
            "-uuid",
            "12345678-ABCD-1234-abcd-1234567890ab",
        ]);
        assert_eq!(c.monitors.len(), 3);
        assert_eq!(c.monitors[0].mode, MonitorMode::Control);
        assert_eq!(
            c.monitors[0].socket.addr,
            SocketAddr::Unix("/tmp/q.sock".into())
        );
        assert!(!c.monitors[0].socket.wait);
        // -monitor (wait=on), then the -mon of chardev m0 (wait=off).
        assert_eq!(c.monitors[1].mode, MonitorMode::Readline);
        assert!(c.monitors[1].socket.wait);
        assert_eq!(
            c.monitors[2].socket.addr,
            SocketAddr::Unix("/tmp/h.sock".into())
        );
        assert!(!c.monitors[2].socket.wait);
        assert_eq!(
            c.uuid.as_deref(),
            Some("12345678-abcd-1234-abcd-1234567890ab")
        );
    }

    #[test]
    fn drive_error_actions() {
        use moat_config::OnError;
        let d = &cfg(&["-drive", "file=/d.img,format=raw"]).drives[0];
        assert_eq!((d.werror, d.rerror), (OnError::Enospc, OnError::Report));
        let d = &cfg(&["-drive", "file=/d.img,format=raw,werror=stop,rerror=ignore"]).drives[0];
        assert_eq!((d.werror, d.rerror), (OnError::Stop, OnError::Ignore));
        let c = cfg(&[
            "-drive",
            "file=/d.img,format=raw,if=none,id=d0,werror=report",
            "-device",
            "virtio-blk-device,drive=d0,rerror=stop",
        ]);
        assert_eq!(
            (c.drives[0].werror, c.drives[0].rerror),
            (OnError::Report, OnError::Stop)
        );
        let c = cfg(&[
            "-drive",
            "file=/d.img,format=raw,if=none,id=d0",
            "-device",
            "virtio-blk-device,drive=d0,num-queues=4",
        ]);
        assert_eq!(c.drives[0].num_queues, 4);
        let q = |n: &str| {
            err(&[
                "-drive",
                "file=/d.img,format=raw,if=none,id=d0",
                "-device",
                &format!("virtio-blk-device,drive=d0,num-queues={n}"),
            ])
        };
        assert!(q("0").contains("larger than 0"));
        assert!(q("17").contains("<= 16"));
        let e = err(&["-drive", "file=/d.img,format=raw,rerror=enospc"]);
        assert!(e.contains("'enospc' invalid read error action"), "{e}");
        let e = err(&["-drive", "file=/d.img,format=raw,werror=bogus"]);
        assert!(e.contains("'bogus' invalid write error action"), "{e}");
    }

    #[test]
    fn vsock_device() {
        let c = cfg(&[
            "-device",
            "virtio-vsock-device,guest-cid=3,uds-path=/run/v.sock,id=vs0",
        ]);
        let v = c.vsock.as_ref().unwrap();
        assert_eq!((v.guest_cid, v.qdev.id()), (3, Some("vs0")));
        assert_eq!(v.port_path(52), PathBuf::from("/run/v.sock_52"));
        assert_eq!(v.seqpacket_path(), PathBuf::from("/run/v.sock.seqpacket"));
        assert!(c
            .unix_socket_paths()
            .contains(&PathBuf::from("/run/v.sock")));
        for bad in [
            "guest-cid=2,uds-path=/v",
            "guest-cid=4294967295,uds-path=/v",
        ] {
            let e = err(&["-device", &format!("virtio-vsock-device,{bad}")]);
            assert!(e.contains("greater than 2"), "{e}");
        }
        assert!(err(&["-device", "virtio-vsock-device,uds-path=/v"]).contains("'guest-cid'"));
        assert!(err(&["-device", "virtio-vsock-device,guest-cid=3"]).contains("'uds-path'"));
        let long = format!(
            "virtio-vsock-device,guest-cid=3,uds-path=/{}",
            "a".repeat(100)
        );
        assert!(err(&["-device", &long]).contains("too long"));
        let one = "virtio-vsock-device,guest-cid=3,uds-path=/v";
        assert!(err(&["-device", one, "-device", one]).contains("only one"));
        let e = err(&["-device", "vhost-vsock-device,guest-cid=3"]);
        assert!(e.contains("virtio-vsock-device,guest-cid="), "{e}");
        assert!(err(&["-device", "vhost-vsock-pci,guest-cid=3"]).contains("/dev/vhost-vsock"));
    }

    #[test]
    fn ids_are_identifiers() {
        // (QEMU's rule, for every option with an id; a '/' would also
        // make a device path of two parts.)
        for a in [
            &["-device", "virtio-rng-device,id=1abc"][..],
            &["-device", "virtio-rng-device,id=a/b"],
            &["-device", "virtio-rng-device,id="],
            &["-drive", "if=none,id=1x"],
            &["-netdev", "tap,id=a/b,ifname=t"],
            &["-netdev", r#"{"type":"tap","id":"x y","ifname":"t"}"#],
            &[
                "-object",
                r#"{"qom-type":"rng-random","id":"r/1","filename":"/dev/urandom"}"#,
            ],
            &["-chardev", "socket,id=_c,path=/s,server=on,wait=off"],
        ] {
            assert!(
                err(a).contains("Parameter 'id' expects an identifier"),
                "{a:?}"
            );
        }
        cfg(&["-device", "virtio-rng-device,id=a-b.c_1"]);
    }

    #[test]
    fn devices_are_named_as_qemu_names_them() {
        // By id=, else by place among the id-less -devices of every kind;
        // the devices if=virtio implies come after every -device.
        let c = cfg(&[
            "-drive",
            "file=/a,format=raw,if=virtio",
            "-device",
            "virtio-rng-device,id=r",
            "-device",
            "virtio-rng-device",
            "-drive",
            "file=/b,format=raw,if=none,id=b",
            "-device",
            "virtio-blk-device,drive=b",
            "-drive",
            "file=/c,format=raw,if=none,id=c",
            "-device",
            "virtio-blk-device,drive=c,id=disk",
        ]);
        let qdev = |i: usize| c.drives[i].qdev.as_ref().map(DeviceName::qdev);
        assert_eq!(
            qdev(0).as_deref(),
            Some("/machine/peripheral-anon/device[2]")
        );
        assert_eq!(
            qdev(1).as_deref(),
            Some("/machine/peripheral-anon/device[1]")
        );
        assert_eq!(qdev(2).as_deref(), Some("disk"));
        assert_eq!(c.rngs[0].qdev.qom_path(), "/machine/peripheral/r");
        assert_eq!(c.rngs[1].qdev, DeviceName::Anonymous(0));
        assert!(err(&[
            "-device",
            "virtio-rng-device,id=x",
            "-drive",
            "file=/c,format=raw,if=none,id=c",
            "-device",
            "virtio-blk-device,drive=c,id=x",
        ])
        .contains("Duplicate ID 'x' for device"));
    }

    #[test]
    fn rng_devices_and_backends() {
        // QEMU's defaults: the built-in source, no limit in practice.
        let r = &cfg(&["-device", "virtio-rng-device"]).rngs[0];
        assert_eq!(r.source, RngSource::Builtin);
        assert_eq!((r.max_bytes, r.period_ms), (i64::MAX as u64, 65536));
        // Objects may come after the device, as in QEMU.
        let c = cfg(&[
            "-device",
            "virtio-rng-device,rng=r0,max-bytes=1024,period=1000,id=rng0",
            "-object",
            "rng-random,id=r0,filename=/dev/random",
            "-object",
            r#"{"qom-type":"rng-builtin","id":"b"}"#,
            "-device",
            "virtio-rng-device,rng=b",
        ]);
        assert_eq!(c.rngs[0].source, RngSource::Device("/dev/random".into()));
        assert_eq!((c.rngs[0].max_bytes, c.rngs[0].period_ms), (1024, 1000));
        assert_eq!(c.rngs[0].qdev.id(), Some("rng0"));
        assert_eq!(c.rngs[1].source, RngSource::Builtin);
        // rng-random reads /dev/urandom unless told otherwise.
        let c = cfg(&[
            "-object",
            "rng-random,id=r",
            "-device",
            "virtio-rng-device,rng=r",
        ]);
        assert_eq!(c.rngs[0].source, RngSource::Device("/dev/urandom".into()));
        // Refusals.
        assert!(err(&["-object", "rng-random,id=r,filename=/etc/shadow"]).contains("leak"));
        assert!(
            err(&["-object", "rng-random,id=r,filename=/dev/../etc/passwd"]).contains("refused")
        );
        assert!(err(&["-object", "rng-egd,id=r,chardev=c"]).contains("daemon"));
        assert!(err(&["-device", "virtio-rng-device,rng=nope"]).contains("can't find value 'nope'"));
        assert!(err(&["-device", "virtio-rng-device,period=0"]).contains("positive integer"));
        assert!(
            err(&["-device", "virtio-rng-device,max-bytes=9223372036854775808"])
                .contains("less than 2^63")
        );
        assert!(err(&["-device", "virtio-rng-device,max-bytes=-1"]).contains("less than 2^63"));
        assert!(err(&["-device", "virtio-rng-device,bogus=1"]).contains("'bogus'"));
        assert!(err(&["-device", "virtio-rng-pci"]).contains("PCI"));
        let twice = [
            "-object",
            "rng-builtin,id=b",
            "-device",
            "virtio-rng-device,rng=b",
            "-device",
            "virtio-rng-device,rng=b",
        ];
        assert!(err(&twice).contains("in use"));
        let wrong = [
            "-object",
            "authz-simple,id=a,identity=x",
            "-device",
            "virtio-rng-device,rng=a",
        ];
        assert!(err(&wrong).contains("rng-backend"));
    }

    #[test]
    fn objects_in_keyval_and_json() {
        let json = r#"{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{"match":"CN=alice","policy":"allow","format":"exact"},{"match":"CN=bob*","policy":"allow","format":"glob"}]}"#;
        let dotted = "authz-list,id=auth0,policy=deny,rules.0.match=CN=alice,rules.0.policy=allow,rules.0.format=exact,rules.1.match=CN=bob*,rules.1.policy=allow,rules.1.format=glob";
        let a = cfg(&["-object", json]).objects;
        let b = cfg(&["-object", dotted]).objects;
        assert_eq!(a, b);
        let Object::AuthzList {
            default_allow,
            rules,
            ..
        } = &a[0]
        else {
            panic!()
        };
        assert!(!default_allow);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[1].format, MatchFormat::Glob);
        assert!(err(&["-object", json, "-object", json]).contains("duplicate"));
        assert!(
            err(&["-object", r#"{"qom-type":"authz-list","id":"x","bogus":1}"#])
                .contains("'bogus'")
        );
    }

    #[test]
    fn sandbox() {
        assert!(cfg(&[]).sandbox);
        assert!(!cfg(&["-sandbox", "off"]).sandbox);
        assert!(
            cfg(&[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ])
            .sandbox
        );
        assert!(err(&["-sandbox", "on,spawn=allow"]).contains("only deny"));
        assert!(err(&["-sandbox", "on,elevateprivileges=children"]).contains("only deny"));
        assert!(err(&["-sandbox", "on,spawn=maybe"]).contains("invalid argument"));
        assert!(err(&["-sandbox", "maybe"]).contains("enable"));
        assert!(cfg(&["-sandbox", "on,landlock=required"]).landlock_required);
        assert!(!cfg(&[]).landlock_required);
        assert!(err(&["-sandbox", "on,landlock=maybe"]).contains("landlock"));
    }

    #[test]
    fn run_with() {
        let c = cfg(&["-run-with", "user=nobody,chroot=/var/empty"]);
        assert_eq!(c.run_as, Some(RunAs::User("nobody".into())));
        assert_eq!(
            c.chroot.as_deref(),
            Some(std::path::Path::new("/var/empty"))
        );
        assert_eq!(
            cfg(&["-run-with", "user=1000:100"]).run_as,
            Some(RunAs::Ids(1000, 100))
        );
        assert_eq!(
            cfg(&["-runas", "kvm"]).run_as,
            Some(RunAs::User("kvm".into()))
        );
        assert_eq!(
            cfg(&["-chroot", "/x"]).chroot.as_deref(),
            Some(std::path::Path::new("/x"))
        );
        assert!(err(&["-run-with", "user=1000:x"]).contains("numbers"));
        assert!(err(&["-run-with", "bogus=1"]).contains("bogus"));
    }

    #[test]
    fn add_fd() {
        let c = cfg(&[
            "-add-fd",
            "fd=5,set=2,opaque=rw:/img",
            "-add-fd",
            "fd=6,set=2",
        ]);
        assert_eq!(
            c.add_fds[0],
            AddFd {
                fd: 5,
                set: 2,
                opaque: Some("rw:/img".into())
            }
        );
        assert_eq!(c.add_fds[1].opaque, None);
        for (bad, why) in [
            ("set=1", "fd option is required"),
            ("fd=-1,set=1", "fd option is required"),
            ("fd=2,set=1", "standard I/O"),
            ("fd=5", "set option is required"),
            ("fd=5,set=x", "set option is required"),
            ("fd=5,set=1,bogus=1", "bogus"),
        ] {
            assert!(err(&["-add-fd", bad]).contains(why), "{bad}");
        }
    }

    #[test]
    fn backing_chains() {
        let d = &cfg(&["-drive", "file=top.qcow2,format=qcow2,backing.driver=qcow2,backing.file.filename=mid.qcow2,backing.backing.driver=raw,backing.backing.file.filename=base.raw,data-file.driver=file,data-file.filename=top.data"]).drives[0];
        assert_eq!(d.format, DriveFormat::Qcow2);
        assert_eq!(
            d.data_file.as_deref(),
            Some(std::path::Path::new("top.data"))
        );
        let Backing::Layer(mid) = &d.backing else {
            panic!("{:?}", d.backing)
        };
        assert_eq!(
            (mid.file.to_str(), mid.format),
            (Some("mid.qcow2"), DriveFormat::Qcow2)
        );
        let Backing::Layer(base) = &mid.backing else {
            panic!("{:?}", mid.backing)
        };
        assert_eq!(
            (base.file.to_str(), base.format, &base.backing),
            (Some("base.raw"), DriveFormat::Raw, &Backing::Unnamed)
        );
        assert_eq!(
            cfg(&["-drive", "file=t,format=qcow2,backing="]).drives[0].backing,
            Backing::None
        );
        assert_eq!(
            cfg(&["-drive", "file=t,format=qcow2"]).drives[0].backing,
            Backing::Unnamed
        );
        for (bad, why) in [
            ("format=qcow2,backing.file.filename=b", "Parameter 'backing.driver' is missing (moat never probes"),
            ("format=qcow2,backing.driver=qcow2", "Parameter 'backing.file' is missing"),
            ("format=qcow2,backing.driver=vmdk,backing.file.filename=b", "'backing.driver' does not accept value 'vmdk'"),
            ("format=qcow2,backing.driver=raw,backing.file.driver=nbd,backing.file.filename=b", "moat opens local files"),
            ("format=raw,backing.driver=raw,backing.file.filename=b", "raw image"),
            ("format=qcow2,backing.driver=raw,backing.file.filename=b,backing.backing.driver=raw,backing.backing.file.filename=c", "raw image"),
            ("format=qcow2,backing=node0", "references to other nodes"),
            ("format=qcow2,backing.backing.driver=raw", "Parameter 'backing.driver' is missing"),
            ("format=qcow2,backing.driver=raw,backing.file.filename=b,backing.bogus=1", "'backing.bogus' is unexpected"),
        ] {
            let e = err(&["-drive", &format!("file=t,{bad}")]);
            assert!(e.contains(why), "{bad}: {e}");
        }
        let deep: String = (1..=MAX_BACKING_DEPTH)
            .map(|i| {
                format!(
                    ",{}driver=qcow2,{}file.filename=f{i}",
                    "backing.".repeat(i),
                    "backing.".repeat(i)
                )
            })
            .collect();
        assert!(err(&["-drive", &format!("file=t,format=qcow2{deep}")]).contains("deeper"));
    }

    #[test]
    fn drives() {
        let c = cfg(&[
            "-drive",
            "file=/a.img,format=raw,if=virtio,serial=abc",
            "-drive",
            "file=/b.img,format=raw,if=none,id=d1,readonly=on,cache=none,discard=unmap",
            "-device",
            "virtio-blk-device,drive=d1,serial=xyz",
        ]);
        assert_eq!(c.drives.len(), 2);
        assert!(c.spare_drives.is_empty());
        assert_eq!(c.drives[0].serial.as_deref(), Some("abc"));
        assert!(c.drives[1].read_only && c.drives[1].discard_unmap);
        assert_eq!(c.drives[1].serial.as_deref(), Some("xyz"));
        // An if=none drive no device uses is kept, as QEMU keeps it.
        let c = cfg(&["-drive", "file=/s.img,format=raw,if=none,id=s"]);
        assert!(c.drives.is_empty());
        assert_eq!(c.spare_drives[0].id.as_deref(), Some("s"));
        assert!(err(&["-drive", "file=/a.img"]).contains("never probes"));
        assert_eq!(
            cfg(&["-drive", "file=/a.img,readonly=on"]).drives[0].format,
            DriveFormat::Raw
        );
        let t = cfg(&["-drive", "file=/a.img,format=raw,throttling.bps-total=5,throttling.iops-read=7,throttling.iops-read-max=9,throttling.iops-read-max-length=3"]).drives[0].throttle;
        assert_eq!(
            (
                t.bps,
                t.iops_rd,
                t.iops_rd_max,
                t.iops_rd_max_length,
                t.bps_max_length
            ),
            (5, 7, 9, 3, 1)
        );
        for (bad, why) in [
            ("throttling.bps-total=5,throttling.bps-read=1", "same time"),
            ("throttling.bps-total-max=5", "require"),
            ("throttling.bps-total=5,throttling.bps-total-max=4", "lower"),
            (
                "throttling.bps-total=5,throttling.bps-total-max-length=2",
                "without burst rate",
            ),
            (
                "throttling.bps-total=5,throttling.bps-total-max-length=0",
                "cannot be 0",
            ),
            ("throttling.bps-total=1000000000000001", "within"),
            ("throttling.bps-total=-1", "bps-total"),
            ("throttling.group=g", "group"),
        ] {
            let e = err(&["-drive", &format!("file=/a.img,format=raw,{bad}")]);
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(err(&["-device", "virtio-blk-device,drive=nope"]).contains("'nope'"));
        assert!(err(&["-device", "e1000"]).contains("unsupported device"));
        assert!(err(&[
            "-drive",
            "file=/a,format=raw,if=none,id=x",
            "-device",
            "virtio-blk,drive=x",
            "-device",
            "virtio-blk,drive=x"
        ])
        .contains("in use"));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(&["-h"]).unwrap(), Action::Help);
        assert_eq!(parse_args(&["--help"]).unwrap(), Action::Help);
        assert_eq!(parse_args(&["-version"]).unwrap(), Action::Version);
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;

    fn cfg(args: &[&str]) -> VmConfig {
        match parse_args(args).unwrap() {
            Action::Run(c) => *c,
            a => panic!("unexpected {a:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        parse_args(args).unwrap_err().to_string()
    }

    #[test]
    fn netdev_tap_and_device_in_keyval_and_json_forms() {
        let smp = ["-smp", "4"];
        let kv = cfg(&[
            &smp[..],
            &[
                "-netdev",
                "tap,id=n0,ifname=tap7,queues=2,vnet_hdr=on,script=no,downscript=no",
                "-device",
                "virtio-net-device,netdev=n0,mac=52:54:00:aa:bb:cc,mq=on,host_mtu=9000,tx-bps=1000000",
            ],
        ]
        .concat());
        let json = cfg(&[
            &smp[..],
            &[
                "-netdev",
                r#"{"type":"tap","id":"n0","ifname":"tap7","queues":2,"vnet_hdr":true,"script":"no","downscript":"no"}"#,
                "-device",
                r#"{"driver":"virtio-net-device","netdev":"n0","mac":"52:54:00:aa:bb:cc","mq":true,"host_mtu":9000,"tx-bps":1000000}"#,
            ],
        ]
        .concat());
        assert_eq!(kv.nics, json.nics);
        let n = &kv.nics[0];
        assert_eq!(n.mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert_eq!(n.queue_pairs(), 2);
        assert_eq!(n.host_mtu, Some(9000));
        assert_eq!(n.tx_limit.bytes_per_sec, 1_000_000);
        assert_eq!(
            n.netdev.backend,
            NetBackendConfig::Tap {
                ifname: Some("tap7".into()),
                fds: vec![],
                queues: 2,
                vnet_hdr: Some(true)
            }
        );
    }

    #[test]
    fn tap_descriptors_stream_and_nic_shorthand() {
        let c = cfg(&[
            "-netdev",
            "tap,id=a,fds=5:6",
            "-device",
            "virtio-net-device,netdev=a",
            "-nic",
            "stream,addr.type=unix,addr.path=/run/passt.sock,server=off",
        ]);
        assert_eq!(c.nics.len(), 2);
        assert_eq!(
            c.nics[0].netdev.backend,
            NetBackendConfig::Tap {
                ifname: None,
                fds: vec![5, 6],
                queues: 2,
                vnet_hdr: None
            }
        );
        // mq is off unless asked: one pair.
        assert_eq!(c.nics[0].queue_pairs(), 1);
        // QEMU's default MACs, counting up.
        assert_eq!(c.nics[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(c.nics[1].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        assert_eq!(
            c.nics[1].netdev.backend,
            NetBackendConfig::Stream {
                path: "/run/passt.sock".into()
            }
        );
        assert!(cfg(&["-nic", "none"]).nics.is_empty());
    }

    #[test]
    fn refusals_name_the_option_and_say_why() {
        for (args, want) in [
            (
                &["-netdev", "tap,id=n,script=/etc/qemu-ifup"][..],
                "never runs scripts",
            ),
            (&["-netdev", "tap,id=n,downscript=/x"], "never runs scripts"),
            (&["-netdev", "tap,id=n,vhost=on"], "vhost-net"),
            (&["-netdev", "user,id=n"], "passt"),
            (&["-netdev", "bridge,id=n,br=br0"], "qemu-bridge-helper"),
            (
                &["-netdev", "socket,id=n"],
                "unsupported netdev type 'socket'",
            ),
            (&["-netdev", "tap,ifname=t"], "Parameter 'id' is missing"),
            (&["-netdev", "tap,id=n,fd=1"], "not a descriptor number"),
            (
                &["-netdev", "tap,id=n,fd=5,fds=6"],
                "cannot be used together",
            ),
            (
                &["-netdev", "tap,id=n,fds=5:6,queues=3"],
                "2 descriptors given for 3 queues",
            ),
            (&["-netdev", "tap,id=n,queues=17"], "1 to 16"),
            (
                &[
                    "-netdev",
                    "stream,id=n,addr.type=inet,addr.host=h,addr.port=1",
                ],
                "UNIX sockets only",
            ),
            (
                &[
                    "-netdev",
                    "stream,id=n,server=on,addr.type=unix,addr.path=/p",
                ],
                "server=on",
            ),
            (&["-netdev", "tap,id=n,bogus=1"], "bogus"),
            (&["-netdev", "{bad json"], "invalid JSON"),
            (
                &["-device", "virtio-net-device"],
                "Parameter 'netdev' is missing",
            ),
            (
                &["-device", "virtio-net-device,netdev=x"],
                "can't find value 'x'",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n",
                    "-device",
                    "virtio-net-device,netdev=n",
                    "-device",
                    "virtio-net-device,netdev=n",
                ],
                "it's in use",
            ),
            (
                &["-netdev", "tap,id=n", "-netdev", "tap,id=n"],
                "Duplicate ID 'n'",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n",
                    "-device",
                    "virtio-net-device,netdev=n,mac=01:00:5e:00:00:01",
                ],
                "multicast",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n",
                    "-device",
                    "virtio-net-device,netdev=n,mac=00:00:00:00:00:00",
                ],
                "all-zero",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n",
                    "-device",
                    "virtio-net-device,netdev=n,mac=52:54",
                ],
                "expected xx:xx",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n",
                    "-device",
                    "virtio-net-device,netdev=n,host_mtu=10",
                ],
                "host_mtu",
            ),
            (
                &[
                    "-netdev",
                    "tap,id=n,queues=4",
                    "-device",
                    "virtio-net-device,netdev=n,mq=on",
                ],
                "more queue pairs than the 1 vCPUs",
            ),
            (&["-device", "virtio-net-pci,netdev=n"], "needs PCI"),
            (&["-nic", "tap,model=e1000"], "model=e1000"),
        ] {
            let e = err(args);
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(
                e.contains(args[args.len() - 2]) || e.contains("-device"),
                "{args:?}: {e}"
            );
        }
    }

    #[test]
    fn drives_and_nics_share_the_virtio_slots() {
        let mut args: Vec<String> = Vec::new();
        for i in 0..MAX_VIRTIO_DEVICES {
            args.push("-nic".into());
            args.push(format!("tap,ifname=t{i}"));
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(cfg(&a).nics.len(), MAX_VIRTIO_DEVICES);
        let mut more = a.clone();
        more.extend(["-drive", "file=/dev/null,format=raw,if=virtio"]);
        assert!(err(&more).contains("virtio devices"));
    }
}
