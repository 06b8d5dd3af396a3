//! AFL++ entry point of the `svid` target (see the crate documentation).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshauth_fuzz::svid(data);
    });
}
