//! AFL++ entry point of the `spiffe_id` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::spiffe_id(data);
    });
}
