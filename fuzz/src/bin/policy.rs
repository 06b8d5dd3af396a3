//! AFL++ entry point of the `policy` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::policy(data);
    });
}
