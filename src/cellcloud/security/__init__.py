"""Security: SigV4 verification of the public API (more — CA, mTLS, attestation — to come)."""
