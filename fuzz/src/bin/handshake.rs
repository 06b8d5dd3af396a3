//! AFL++ entry point of the `handshake` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::handshake(data);
    });
}
