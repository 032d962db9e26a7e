"""One peer's state and step: synchronous, no I/O (layer 4).

The simulator and the daemon drive the same object through the same loop::

    loss = peer.gradient(k)
    for phase in peer.phases:                      # ("V", "X"), or ("X",) for DSGD
        out = peer.message(phase, k)               # encode once, same payload to every recipient
        received = exchange(phase, k, out)         # {sender: {name: decoded tensor}}
        peer.mix(phase, k, received)

Mixing (ALGORITHMS.md §1.2, §3.3), per tensor, for the phase's pre-mix value Z (U or Y):

* identity codec and γ = 1: exact mixing ``Z_i ← w_ii Z_i + Σ_j w_ij Z_j``, summed self first,
  then in-neighbours by increasing id, so every run of the same inputs is bitwise identical;
* otherwise C-DeMuon Option A: the sender transmits ``q = C(Z − Ẑ_self)``, every holder of that
  replica adds the same decoded ``q``; then ``Z_i ← Z_i + γ (Σ_j w_ij Ẑ_j − Ẑ_i)``. Replicas are
  kept per in-neighbour so a keyframe (a full replica) can resynchronise one neighbour.

Missing-neighbour policy: a neighbour whose message did not arrive in time contributes its weight
to self for that round (exact: ``w_ij Z_i``; compressed: its replica term is dropped, since
``Ẑ_i − Ẑ_i = 0``), and it is reported in the :class:`MixReport`. With compression a miss also
marks that neighbour's replica stale until its next keyframe: stale replicas are treated as missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from demuon.config import Config, IdentityCodec
from demuon.node import optim
from demuon.topology import PeerView
from demuon.transport.codecs import Codec, Encoded, make_codec
from demuon.workloads import Workload

TensorDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MixReport:
    """What one mixing step used: who arrived, who was missing, who was resynchronised."""

    phase: str
    round: int
    received: tuple[int, ...]
    missing: tuple[int, ...]
    keyframes: tuple[int, ...] = ()


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else is taken as written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ns_dtype_for(setting: str, device: torch.device) -> torch.dtype:
    """Newton–Schulz compute dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def codec_seed(seed: int, sender: int, k: int, phase: str, tensor: int) -> int:
    """Deterministic 63-bit seed for a codec's randomness, shared by sender and receivers."""
    h = hashlib.blake2b(f"{seed}/{sender}/{k}/{phase}/{tensor}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def fingerprint(tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
    """float64 sum and L2 norm over all entries of ``tensors``."""
    total = sum((t.detach().double().sum() for t in tensors), torch.zeros((), dtype=torch.float64))
    sq = sum((t.detach().double().square().sum() for t in tensors), torch.zeros((), dtype=torch.float64))
    return float(total), float(sq.sqrt())


class Peer:
    """Peer ``index``: its model copy X, momentum M, tracker V, last gradient G, and replicas."""

    def __init__(
        self,
        index: int,
        config: Config,
        workload: Workload,
        views: Sequence[PeerView],  # one view per round of the topology's period (views[k % len])
        *,
        device: torch.device | None = None,
    ) -> None:
        if not views or any(v.index != index for v in views):
            raise ValueError(f"views must be non-empty and all for peer {index}")
        self.index = index
        self.config = config
        self.workload = workload
        self.views = tuple(views)
        self.device = device if device is not None else resolve_device(config.device)
        self.algorithm = config.algorithm
        self.phases: tuple[str, ...] = optim.phases(self.algorithm.name)
        self.dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.model = workload.build_model(config.seed).to(self.device, self.dtype)
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        self.names = tuple(self.params)
        self.routes = {
            n: optim.route_for(n, tuple(p.shape), self.algorithm.routing) for n, p in self.params.items()
        }
        self.ns_dtype = ns_dtype_for(self.algorithm.routing.ns_dtype, self.device)
        self.codec: Codec = make_codec(config.gossip.codec)
        self.keyframe_codec: Codec = make_codec(IdentityCodec())  # full replicas travel uncompressed
        self.gamma = config.gossip.gamma
        self.exact = config.gossip.codec.kind == "identity" and self.gamma == 1.0
        self.round = 0
        self.last_loss = float("nan")
        self.M: TensorDict = self._zeros()
        self.V: TensorDict = self._zeros()
        self.G: TensorDict = self._zeros()
        self._pending: dict[str, TensorDict] = {}
        senders = sorted({j for v in self.views for j, _ in v.in_neighbours})
        # Option A replicas: own Ẑ_i and per in-neighbour Ẑ_j, for each phase. X̂ starts at X⁰ everywhere.
        self.hat_self: dict[str, TensorDict] = {ph: self._initial_replica(ph) for ph in self.phases}
        self.hat: dict[str, dict[int, TensorDict]] = {
            ph: {j: self._initial_replica(ph) for j in senders} for ph in self.phases
        }
        self.stale: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ helpers
    def _zeros(self) -> TensorDict:
        return {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params.items()}

    def _initial_replica(self, phase: str) -> TensorDict:
        if phase == "X":
            return {n: p.detach().clone() for n, p in self.params.items()}
        return self._zeros()

    def view(self, k: int) -> PeerView:
        return self.views[k % len(self.views)]

    def X(self) -> TensorDict:
        """The current iterate (detached views of the model's parameters)."""
        return {n: p.detach() for n, p in self.params.items()}

    def lr(self, k: int) -> float:
        a = self.algorithm
        return optim.learning_rate(a.schedule, a.lr, k, self.config.rounds)

    # ------------------------------------------------------------ who talks to whom
    def recipients(self, k: int) -> tuple[int, ...]:
        """Out-neighbours for round k. With compression, every peer that ever mixes our replica
        gets every update (the union over the topology's period), so replicas never diverge."""
        if self.exact:
            return self.view(k).out_neighbours
        return tuple(sorted({j for v in self.views for j in v.out_neighbours}))

    def expected_senders(self, k: int) -> tuple[int, ...]:
        if self.exact:
            return tuple(j for j, _ in self.view(k).in_neighbours)
        return tuple(sorted(self.hat[self.phases[0]]))

    # ------------------------------------------------------------------ the round
    def gradient(self, k: int) -> float:
        """G ← ∇f_i(X; ξ_{i,k}) on this peer's batch for round k. Returns the loss."""
        self.round = k
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        batch = self.workload.train_batch(self.index, self.config.peers, k)
        loss = self.workload.loss(self.model, batch)
        loss.backward()
        self.G = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in self.params.items()
        }
        self.last_loss = float(loss.detach())
        return self.last_loss

    def _pre_mix(self, phase: str, k: int) -> TensorDict:
        """U (phase V) or Y (phase X): the value this peer contributes to the mix."""
        a = self.algorithm
        if phase == "V":
            self.M, U = optim.local_tracker_update(a.name, self.M, self.V, self.G, a.theta)
            return U
        return optim.local_step(
            a.name,
            self.X(),
            self.V,
            self.G,
            self.lr(k),
            k,
            routes=self.routes,
            ns_steps=a.routing.ns_steps,
            ns_dtype=self.ns_dtype,
            clip_scale=a.clip_scale,
            clip_power=a.clip_power,
        )

    def message(self, phase: str, k: int, *, keyframe: bool = False) -> dict[str, Encoded]:
        """Form this phase's pre-mix value and encode what goes on the wire (once, for all).

        Exact mode: the value itself. Compressed: ``q = C(Z − Ẑ_self)``, and ``Ẑ_self += decode(q)``.
        ``keyframe=True`` (compressed only) sends the full updated replica ``Ẑ_self`` instead."""
        Z = self._pre_mix(phase, k)
        self._pending[phase] = Z
        if self.exact:
            return {n: self.codec.encode(z.contiguous(), seed=0) for n, z in Z.items()}
        hat = self.hat_self[phase]
        out: dict[str, Encoded] = {}
        for t, (n, z) in enumerate(Z.items()):
            enc = self.codec.encode(z - hat[n], seed=codec_seed(self.config.seed, self.index, k, phase, t))
            hat[n] = hat[n] + self.codec.decode(enc, tuple(z.shape), z.dtype).to(self.device)
            out[n] = enc
        if keyframe:
            return {n: self.keyframe_codec.encode(h, seed=0) for n, h in hat.items()}
        return out

    def pending(self, phase: str) -> TensorDict:
        """The pre-mix value of ``phase`` (U or Y) between :meth:`message` and :meth:`mix`."""
        return dict(self._pending[phase])

    def decode(self, enc: Mapping[str, Encoded], *, keyframe: bool = False) -> TensorDict:
        """Decode a peer's encoded message as a receiver does (keyframes are identity-coded)."""
        codec = self.keyframe_codec if keyframe else self.codec
        return {n: codec.decode(e, tuple(self.params[n].shape), self.dtype) for n, e in enc.items()}

    def mix(
        self,
        phase: str,
        k: int,
        received: Mapping[int, Mapping[str, torch.Tensor]],  # sender → decoded payload (not modified)
        *,
        keyframes: frozenset[int] = frozenset(),  # senders whose payload is a full replica
    ) -> MixReport:
        """Combine the pending pre-mix value with the neighbours' messages and store the result
        (phase V → V; phase X → the model's parameters)."""
        Z = self._pending.pop(phase)
        view = self.view(k)
        if self.exact:
            new, missing = self._mix_exact(view, Z, received)
        else:
            new, missing = self._mix_replicas(phase, view, Z, received, keyframes)
        if phase == "V":
            self.V = new
        else:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(new[n])
        return MixReport(phase, k, tuple(sorted(received)), missing, tuple(sorted(keyframes & set(received))))

    def _mix_exact(
        self, view: PeerView, Z: TensorDict, received: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> tuple[TensorDict, tuple[int, ...]]:
        missing = tuple(j for j, _ in view.in_neighbours if j not in received)
        w_self = view.self_weight + sum(w for j, w in view.in_neighbours if j in missing)
        out: TensorDict = {}
        for n, z in Z.items():
            terms = [(w_self, z)]
            terms += [(w, received[j][n].to(self.device)) for j, w in view.in_neighbours if j in received]
            out[n] = optim.mix(terms)
        return out, missing

    def _mix_replicas(
        self,
        phase: str,
        view: PeerView,
        Z: TensorDict,
        received: Mapping[int, Mapping[str, torch.Tensor]],
        keyframes: frozenset[int],
    ) -> tuple[TensorDict, tuple[int, ...]]:
        hats = self.hat[phase]
        for j, payload in received.items():
            if j not in hats:
                continue
            if j in keyframes:
                hats[j] = {n: payload[n].to(self.device).clone() for n in self.names}
                self.stale.discard((phase, j))
            elif (phase, j) not in self.stale:
                hats[j] = {n: hats[j][n] + payload[n].to(self.device) for n in self.names}
        for j in hats:
            if j not in received:
                self.stale.add((phase, j))  # its replica advanced without us: wait for a keyframe
        usable = [(j, w) for j, w in view.in_neighbours if (phase, j) not in self.stale]
        missing = tuple(j for j, _ in view.in_neighbours if (phase, j) in self.stale)
        w_self = view.self_weight + sum(w for j, w in view.in_neighbours if j in missing)
        own = self.hat_self[phase]
        out: TensorDict = {}
        for n, z in Z.items():
            S = optim.mix([(w_self, own[n])] + [(w, hats[j][n]) for j, w in usable])
            out[n] = optim.choco_mix(z, S, own[n], self.gamma)
        return out, missing

    # ------------------------------------------------------------ observation, persistence
    def fingerprint(self) -> tuple[float, float]:
        return fingerprint(list(self.params.values()))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this peer exactly (batches are a pure function of
        (seed, peer, round), so no RNG state is needed beyond the round)."""
        return {
            "index": self.index,
            "round": self.round,
            "model": {n: p.detach().cpu().clone() for n, p in self.params.items()},
            "M": _to_cpu(self.M),
            "V": _to_cpu(self.V),
            "hat_self": {ph: _to_cpu(h) for ph, h in self.hat_self.items()},
            "hat": {ph: {j: _to_cpu(h) for j, h in hs.items()} for ph, hs in self.hat.items()},
            "stale": sorted(self.stale),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["index"] != self.index:
            raise ValueError(f"state is for peer {state['index']}, not {self.index}")
        dev: Callable[[TensorDict], TensorDict] = lambda d: {n: t.to(self.device) for n, t in d.items()}  # noqa: E731
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["model"][n])
        self.round = int(state["round"])
        self.M, self.V = dev(state["M"]), dev(state["V"])
        self.hat_self = {ph: dev(h) for ph, h in state["hat_self"].items()}
        self.hat = {ph: {int(j): dev(h) for j, h in hs.items()} for ph, hs in state["hat"].items()}
        self.stale = {(str(ph), int(j)) for ph, j in state["stale"]}


def _to_cpu(d: TensorDict) -> TensorDict:
    return {n: t.detach().cpu().clone() for n, t in d.items()}
