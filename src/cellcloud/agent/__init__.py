"""The host agent (Nitro's role): owns one host's environments; a server only."""
