//! AFL++ entry point of the `relay` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::relay(data);
    });
}
