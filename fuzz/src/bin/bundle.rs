//! AFL++ entry point of the `bundle` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::bundle_target(data);
    });
}
