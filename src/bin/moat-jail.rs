//! `moat-jail`: start moat unprivileged in its own namespaces, root and
//! cgroup (see crates/jail).

fn main() {
    std::process::exit(moat_jail::main());
}
