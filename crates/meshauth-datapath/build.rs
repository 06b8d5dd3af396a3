//! Compiles the eBPF programs with clang (`-target bpf`) and checks the shared layouts.
//!
//! Needs the Debian packages `clang-16` (or `clang`), `libbpf-dev` (bpf_helpers.h) and
//! `linux-libc-dev` (UAPI headers); `scripts/setup.sh` installs them. The layout check compiles
//! `bpf/abi.h` for the host and records `sizeof`/`offsetof` of every shared struct, which a test
//! compares with the Rust mirrors in `src/abi.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in ["bpf/datapath.bpf.c", "bpf/abi.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let clang = find_clang();
    for header in ["/usr/include/bpf/bpf_helpers.h", "/usr/include/linux/bpf.h"] {
        if !Path::new(header).exists() {
            fail(&format!(
                "{header} is missing: install the Debian packages libbpf-dev and linux-libc-dev (scripts/setup.sh does)"
            ));
        }
    }
    let obj = out.join("datapath.bpf.o");
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg("-c")
        .arg("bpf/datapath.bpf.c")
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| fail(&format!("cannot run {clang}: {e}")));
    if !status.success() {
        fail("clang failed to compile bpf/datapath.bpf.c (see the errors above)");
    }
    layout_check(&out);
}

fn find_clang() -> String {
    for c in ["clang-16", "clang"] {
        if Command::new(c).arg("--version").output().is_ok() {
            return c.to_owned();
        }
    }
    fail("clang is missing: install the Debian package clang-16 (scripts/setup.sh does)")
}

/// Writes `abi_layout.rs`: (struct, field, offset) and (struct, size) as the C compiler sees them.
fn layout_check(out: &Path) {
    let fields: &[(&str, &[&str])] = &[
        (
            "ma_endpoint",
            &["endpoint_id", "identity", "ipv4", "flags", "policy_gen"],
        ),
        ("ma_ipcache_key", &["prefixlen", "addr"]),
        ("ma_ipcache_value", &["identity", "node_id"]),
        (
            "ma_policy_key",
            &[
                "prefixlen",
                "endpoint_id",
                "remote_identity",
                "direction",
                "protocol",
                "dport",
            ],
        ),
        ("ma_policy_value", &["verdict", "auth_type"]),
        (
            "ma_auth_key",
            &[
                "local_identity",
                "remote_identity",
                "remote_node",
                "auth_type",
                "protocol",
                "saddr",
                "daddr",
                "sport",
                "dport",
            ],
        ),
        ("ma_auth_value", &["expires_ns"]),
        (
            "ma_ct_key",
            &[
                "saddr",
                "daddr",
                "sport",
                "dport",
                "protocol",
                "direction",
                "icmp_type",
            ],
        ),
        (
            "ma_ct_value",
            &[
                "created_ns",
                "last_seen_ns",
                "auth_key",
                "flags",
                "endpoint_id",
                "policy_gen",
                "ipcache_gen",
            ],
        ),
        (
            "ma_config",
            &[
                "auth_miss_action",
                "hold_mark",
                "event_interval_ns",
                "ipcache_gen",
                "ct_timeout_tcp_s",
                "ct_timeout_other_s",
                "tunnel_ifindex",
                "local_node",
            ],
        ),
        (
            "ma_event",
            &[
                "ts_ns",
                "saddr",
                "daddr",
                "sport",
                "dport",
                "protocol",
                "tcp_flags",
                "verdict",
                "reason",
                "src_identity",
                "dst_identity",
                "ifindex",
                "direction",
                "flags",
                "icmp_type",
                "auth_key",
            ],
        ),
    ];
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n#include \"abi.h\"\nint main(void) {\n",
    );
    c.push_str("printf(\"pub(crate) const C_LAYOUT: &[(&str, &str, usize)] = &[\\n\");\n");
    for (s, fs) in fields {
        c.push_str(&format!(
            "printf(\"(\\\"{s}\\\", \\\"(size)\\\", %zu),\\n\", sizeof(struct {s}));\n"
        ));
        for f in *fs {
            c.push_str(&format!(
                "printf(\"(\\\"{s}\\\", \\\"{f}\\\", %zu),\\n\", offsetof(struct {s}, {f}));\n"
            ));
        }
    }
    c.push_str("printf(\"];\\n\");\n");
    // Every `#define MA_<NAME> <value>` of the header, for the constants check.
    let header = std::fs::read_to_string("bpf/abi.h").expect("read bpf/abi.h");
    c.push_str("printf(\"pub(crate) const C_CONSTANTS: &[(&str, u64)] = &[\\n\");\n");
    for line in header.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#define"), Some(name)) = (words.next(), words.next())
            && name.starts_with("MA_")
            && name != "MA_ABI_VERSION"
            && words.next().is_some()
        {
            c.push_str(&format!(
                "printf(\"(\\\"{name}\\\", %llu),\\n\", (unsigned long long)({name}));\n"
            ));
        }
    }
    c.push_str("printf(\"];\\n\");\n");
    c.push_str(
        "printf(\"pub(crate) const C_ABI_VERSION: u32 = %d;\\n\", MA_ABI_VERSION);\nreturn 0;\n}\n",
    );
    let src = out.join("abi_layout.c");
    std::fs::write(&src, c).expect("write abi_layout.c");
    let exe = out.join("abi_layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc)
        .arg("-Ibpf")
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        fail(&format!(
            "cannot compile the layout check with {cc}: install gcc or set CC"
        ));
    }
    let printed = Command::new(&exe).output().expect("run abi_layout");
    std::fs::write(out.join("abi_layout.rs"), printed.stdout).expect("write abi_layout.rs");
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
