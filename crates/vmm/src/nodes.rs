//! Block nodes as QEMU names, lists and describes them. Every layer of an
//! image chain (a drive's, or a `blockdev-add` node's) is a format node
//! over a protocol node, its file, and one more for an external data
//! file. QEMU names the nodes it makes itself `#blockNNN` in the order it
//! opens them (each layer's file, the layer, its data file, then the layer
//! below) and lists every named node newest first.

use crate::Disk;
use moat_api::{BlockNode, FileStats, ImageInfo};
use moat_config::{Backing, DriveConfig, DriveFormat, ImageLayer};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Format,
    File,
    DataFile,
}

/// One node of a chain.
#[derive(Debug, Clone)]
pub struct ChainNode {
    pub name: String,
    pub role: Role,
    /// Its layer's place in the chain: 0 for the top, the one written.
    pub depth: usize,
    pub layer: ImageLayer,
}

impl ChainNode {
    /// The file a protocol node stands for.
    fn path(&self) -> &Path {
        match self.role {
            Role::DataFile => self.layer.data_file.as_deref().unwrap_or(&self.layer.file),
            Role::Format | Role::File => &self.layer.file,
        }
    }

    /// Is this its layer's primary file: the data file when the layer has
    /// one (the guest's data goes there, QEMU counts writes there), else
    /// the file?
    pub fn primary(&self) -> bool {
        match self.role {
            Role::DataFile => true,
            Role::File => self.layer.data_file.is_none(),
            Role::Format => false,
        }
    }

    /// Is this the node whose writes moat watches: the top layer's primary
    /// file?
    pub fn watched(&self) -> bool {
        self.depth == 0 && self.primary()
    }
}

/// An automatic node name.
fn auto_name(n: usize) -> String {
    format!("#block{n:03}")
}

/// The nodes of the chain topped by `top`, in the order QEMU opens them,
/// automatic names counting from `first`; and the next free number.
/// `top_name` is the name the user gave the top node (`blockdev-add`);
/// `bare`: the top is a bare file (`driver=file`), one node of that name.
pub fn chain(
    top: ImageLayer,
    mut first: usize,
    top_name: Option<&str>,
    bare: bool,
) -> (Vec<ChainNode>, usize) {
    let mut next = |given: Option<&str>| {
        given.map(str::to_string).unwrap_or_else(|| {
            first += 1;
            auto_name(first - 1)
        })
    };
    if bare {
        let name = next(top_name);
        let node = ChainNode {
            name,
            role: Role::File,
            depth: 0,
            layer: top,
        };
        return (vec![node], first);
    }
    let mut nodes = Vec::new();
    let mut layer = Some(top);
    let mut depth = 0;
    while let Some(l) = layer {
        let mut add = |role, name| {
            nodes.push(ChainNode {
                name,
                role,
                depth,
                layer: l.clone(),
            })
        };
        add(Role::File, next(None));
        add(Role::Format, next(top_name.filter(|_| depth == 0)));
        if l.data_file.is_some() {
            add(Role::DataFile, next(None));
        }
        layer = match l.backing {
            Backing::Layer(b) => Some(*b),
            Backing::None | Backing::Unnamed => None,
        };
        depth += 1;
    }
    (nodes, first)
}

/// What the host holds of an image chain (QEMU's ImageInfo): `top` is
/// the opened image of `layer`, the layers below it are looked at by name.
pub fn image_info(layer: &ImageLayer, top: Option<&dyn moat_block::DiskImage>) -> ImageInfo {
    let meta = std::fs::metadata(&layer.file).ok();
    let actual_size = meta.as_ref().map(|m| m.blocks() * 512).unwrap_or(0);
    let (virtual_size, qcow2) = match (top, layer.format) {
        (Some(d), _) => (d.size(), d.qcow2_info()),
        (None, DriveFormat::Qcow2) => match std::fs::File::open(&layer.file) {
            Ok(f) => (
                moat_block::qcow2::virtual_size(&f).unwrap_or(0),
                moat_block::qcow2::info(&f),
            ),
            Err(_) => (0, None),
        },
        (None, DriveFormat::Raw) => (meta.map_or(0, |m| m.len()), None),
    };
    ImageInfo {
        filename: layer.file.clone(),
        format: layer.format.name().to_string(),
        virtual_size,
        actual_size,
        qcow2,
        backing: match &layer.backing {
            Backing::Layer(b) => Some(Box::new(image_info(b, None))),
            _ => None,
        },
    }
}

/// The driver of a protocol node on a file with `meta`: `host_device` for
/// a block device.
fn file_driver(meta: Option<&std::fs::Metadata>) -> &'static str {
    match meta {
        Some(m) if m.file_type().is_block_device() => "host_device",
        _ => "file",
    }
}

/// Node `n` of the chain of a drive (or node) configured as `cfg` and
/// opened as `disk`, as QEMU describes it; `threshold` is its write
/// threshold.
pub fn describe(n: &ChainNode, cfg: &DriveConfig, disk: &Disk, threshold: u64) -> BlockNode {
    // (Nothing writes the layers below the top.)
    let read_only = cfg.read_only || n.depth > 0;
    let image = match n.role {
        Role::Format => image_info(&n.layer, (n.depth == 0).then_some(&*disk.image)),
        Role::File | Role::DataFile => {
            let meta = std::fs::metadata(n.path()).ok();
            let driver = file_driver(meta.as_ref());
            let virtual_size = match &meta {
                // (QEMU counts a file in whole sectors.)
                Some(m) if driver == "file" => m.len().div_ceil(512) * 512,
                _ if n.depth == 0 && n.layer.format == DriveFormat::Raw => disk.image.size(),
                _ => 0,
            };
            ImageInfo {
                filename: n.path().to_path_buf(),
                format: driver.to_string(),
                virtual_size,
                actual_size: meta.map_or(0, |m| m.blocks() * 512),
                qcow2: None,
                backing: None,
            }
        }
    };
    BlockNode {
        node_name: n.name.clone(),
        driver: image.format.clone(),
        read_only,
        cache: cfg.cache,
        image,
        write_threshold: threshold,
    }
}

/// A protocol node's counters: the watched node's are `disk`'s, any other
/// node's are zero (nothing writes it, or moat does not count it).
pub fn file_stats(n: &ChainNode, disk: &Disk) -> FileStats {
    let driver = file_driver(std::fs::metadata(n.path()).ok().as_ref()).to_string();
    let node_name = n.name.clone();
    if !n.watched() {
        return FileStats {
            node_name,
            driver,
            ..FileStats::default()
        };
    }
    let s = &disk.link.stats;
    let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    FileStats {
        node_name,
        driver,
        wr_highest_offset: g(&s.file_wr_highest_offset),
        discard_ok: g(&s.discard_ok),
        discard_failed: g(&s.discard_failed),
        discard_bytes_ok: g(&s.discard_bytes_ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn layer(file: &str, data: Option<&str>, below: Option<ImageLayer>) -> ImageLayer {
        ImageLayer {
            file: PathBuf::from(file),
            format: DriveFormat::Qcow2,
            backing: below.map_or(Backing::None, |b| Backing::Layer(Box::new(b))),
            data_file: data.map(PathBuf::from),
        }
    }

    fn names(nodes: &[ChainNode]) -> Vec<(String, Role, usize)> {
        nodes
            .iter()
            .map(|n| (n.name.clone(), n.role, n.depth))
            .collect()
    }

    #[test]
    fn chains_are_named_as_qemu_opens_them() {
        let base = layer("/base", Some("/base.data"), None);
        let (nodes, next) = chain(layer("/top", None, Some(base.clone())), 4, None, false);
        let s = |n: &str| n.to_string();
        assert_eq!(
            names(&nodes),
            [
                (s("#block004"), Role::File, 0),
                (s("#block005"), Role::Format, 0),
                (s("#block006"), Role::File, 1),
                (s("#block007"), Role::Format, 1),
                (s("#block008"), Role::DataFile, 1),
            ]
        );
        assert_eq!(next, 9);
        assert_eq!(nodes[4].path(), Path::new("/base.data"));
        assert!(nodes[0].watched() && !nodes[2].watched() && !nodes[4].watched());
        // A named top takes no number; a data file on the top is watched.
        let (nodes, next) = chain(layer("/t", Some("/t.data"), None), 0, Some("n"), false);
        assert_eq!(
            names(&nodes),
            [
                (s("#block000"), Role::File, 0),
                (s("n"), Role::Format, 0),
                (s("#block001"), Role::DataFile, 0),
            ]
        );
        assert_eq!(next, 2);
        assert!(!nodes[0].watched() && nodes[2].watched());
        let (nodes, next) = chain(layer("/f", None, None), 3, Some("f"), true);
        assert_eq!(names(&nodes), [(s("f"), Role::File, 0)]);
        assert_eq!(next, 3);
    }
}
