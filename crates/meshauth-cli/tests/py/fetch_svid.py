"""Fetches an X.509-SVID with the Python `spiffe` package and checks it against the bundle.

Usage: fetch_svid.py SOCKET_PATH EXPECTED_SPIFFE_ID
"""
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    socket_path, expected = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient(socket_path=f"unix://{socket_path}")
    try:
        svid = client.fetch_x509_svid()
        if str(svid.spiffe_id) != expected:
            print(f"unexpected SPIFFE ID {svid.spiffe_id}, wanted {expected}")
            return 1
        bundles = client.fetch_x509_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle is None:
            print("no bundle for the SVID's trust domain")
            return 1
        leaf = svid.leaf
        issuers = [ca for ca in bundle.x509_authorities if ca.subject == leaf.issuer]
        if not issuers:
            print("no authority in the bundle issued the SVID")
            return 1
        issuers[0].public_key().verify(
            leaf.signature,
            leaf.tbs_certificate_bytes,
            __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(
                leaf.signature_hash_algorithm
            ),
        )
        print(f"ok {svid.spiffe_id}")
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
