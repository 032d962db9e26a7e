"""A private LAN of network namespaces for tests that need real links (root and ``ip`` required):
the user tool's own LAN (:mod:`demuon.app.netlab`), so the tests exercise what ``demuon netlab``
builds. ``lan(n, tag)`` makes a switch namespace with a bridge and ``n`` peer namespaces
(``10.213.<subnet>.<i+1>/24`` on each ``eth0``); everything is removed on exit, also on failure."""

from __future__ import annotations

from demuon.app.netlab import PEER_IF, Lan, existing_namespaces, lan, run_command

__all__ = ["PEER_IF", "Lan", "existing_namespaces", "lan", "run_command"]
