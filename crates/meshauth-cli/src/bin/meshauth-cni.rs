//! `meshauth-cni`: the CNI plugin binary (see the `meshauth-cni` crate). The runtime runs it
//! with the CNI environment and the network configuration on stdin; it prints the result or
//! the spec's error document on stdout.

fn main() -> std::process::ExitCode {
    let (out, ok) = meshauth_cni::run();
    if !out.is_empty() {
        println!("{out}");
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
