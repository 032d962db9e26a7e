"""demuon: a peer-to-peer gossip training daemon (decentralized Muon over ZeroMQ)."""

__version__ = "0.1.0"
