"""One peer's state and step: synchronous, no I/O (layer 4).

The simulator and the daemon drive the same object through the one round driver,
:func:`demuon.node.rounds.run_round`::

    loss = peer.gradient(k)
    for phase in peer.phases:                      # ("V", "X"), or ("X",) for DSGD
        out = peer.message(phase, k)               # encode once, same payload to every recipient
        received = exchange(phase, k, out)         # {sender: {name: decoded tensor}}
        peer.mix(phase, k, received)

A peer is given the config sections it uses (``AlgorithmConfig``, ``GossipConfig``) and a
:class:`PeerSetup` with the run's shape and a resolved device and dtype, never the root config.

Mixing (docs/algorithms.md §2.1, §6), per tensor, for the phase's pre-mix value Z (U or Y), with
the phase's own codec and γ (``gossip.v`` / ``gossip.x``, else ``gossip.codec`` / ``gossip.gamma``):

* identity codec and γ = 1: exact mixing ``Z_i ← w_ii Z_i + Σ_j w_ij Z_j``, summed self first,
  then in-neighbours by increasing id, so every run of the same inputs is bitwise identical;
* otherwise C-DeMuon Option A: the sender transmits ``q = C(Z − Ẑ_self)``, every holder of that
  replica adds the same decoded ``q``; then ``Z_i ← Z_i + γ (Σ_j w_ij Ẑ_j − Ẑ_i)``. Replicas are
  kept per in-neighbour so a keyframe (a full replica) can resynchronise one neighbour.

Missing-neighbour policy: a neighbour whose message did not arrive in time contributes its weight
to self for that round (exact: ``w_ij Z_i``; compressed: its replica term is dropped, since
``Ẑ_i − Ẑ_i = 0``), and it is reported in the :class:`MixReport`. With compression a miss also
marks that neighbour's replica stale until its next keyframe: stale replicas are treated as missing.

Optional guard (``gossip.clip = "self_centred"``, exact mode, docs/algorithms.md §8.1): before the
sum, every arrived neighbour value is replaced by ``Z_i + clip(Z_j − Z_i, τ)``: ``Y_j`` against
``Y_i`` in phase X, and in phase V the running sum ``S_j`` against the own ``S_i`` (``U_j`` against
``U_i`` without running sums). ``τ = clip_multiple · max s_i`` over the last ``clip_window`` rounds,
``s_i = ‖Y_i − X_i‖`` (phase X) or ``‖M_i‖`` (phase V): the peer's own numbers only.
Off, the mix is the code path it always was; on but never binding, the sums are bitwise the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from demuon.config import AlgorithmConfig, GossipConfig, IdentityCodec
from demuon.errors import ConfigError
from demuon.node import algorithms, optim
from demuon.topology import PeerView
from demuon.transport.codecs import Codec, Encoded, make_codec
from demuon.workloads import Workload

TensorDict = dict[str, torch.Tensor]

#: Suffix of the replica-sum tensors a compressed keyframe carries next to each replica.
SUM_SUFFIX = "@sum"

#: Running tracker sums S and ρ are kept (and sent) in float64: in float32 they lose the small
#: increments U once S has grown, which leaves a floor under ‖mean V − mean M‖ (docs/algorithms.md §8).
SUM_DTYPE = torch.float64


@dataclass(frozen=True)
class MixReport:
    """What one mixing step used: who arrived, who was missing, who was resynchronised."""

    phase: str
    round: int
    received: tuple[int, ...]
    missing: tuple[int, ...]
    keyframes: tuple[int, ...] = ()
    clipped: tuple[int, ...] = ()  # senders whose value the guard moved (docs/algorithms.md §8.1)


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else is taken as written, and a
    CUDA device on a machine without one is a :class:`~demuon.errors.ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", name, "this torch build or machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", name, f"only {torch.cuda.device_count()} CUDA device(s) present")
    return device


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """The parameter/state dtype named by the config (``float32`` or ``float64``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError("dtype", name, f"expected one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class PeerSetup:
    """The run-level facts a peer needs, resolved by the composition root."""

    seed: int  # shared seed: initial model, data shards, codec randomness
    n_peers: int  # N
    rounds: int  # K, for the step-size schedule
    device: torch.device
    dtype: torch.dtype  # parameters and optimizer state


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
        workload: Workload,
        views: Sequence[PeerView],  # one view per round of the topology's period (views[k % len])
        *,
        algorithm: AlgorithmConfig,
        gossip: GossipConfig,
        setup: PeerSetup,
        schedule: Sequence[tuple[int, Sequence[PeerView]]] = (),  # (from round, views) after leaves
    ) -> None:
        if not views or any(v.index != index for v in views):
            raise ValueError(f"views must be non-empty and all for peer {index}")
        self.index = index
        self.setup = setup
        self.workload = workload
        self.views = tuple(views)
        self.reschedule(schedule)
        self.device = setup.device
        self.dtype = setup.dtype
        self.algorithm = algorithm
        self.rule = algorithms.get(algorithm.name)
        self.phases: tuple[str, ...] = self.rule.phases
        self.model = workload.build_model(setup.seed).to(self.device, self.dtype)
        self.params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        self.names = tuple(self.params)
        self.numel = sum(p.numel() for p in self.params.values())
        routes = {n: optim.route_for(n, tuple(p.shape), algorithm.routing) for n, p in self.params.items()}
        self.routes = routes
        self.ns_dtype = ns_dtype_for(algorithm.routing.ns_dtype, self.device)
        self.step_options = algorithms.StepOptions(
            routes=routes,
            ns_steps=algorithm.routing.ns_steps,
            ns_dtype=self.ns_dtype,
            clip_scale=algorithm.clip_scale,
            clip_power=algorithm.clip_power,
            weight_decay=algorithm.weight_decay,
            adjust_lr=algorithm.adjust_lr,
        )
        # MVR momentum (docs/algorithms.md §2.6): G̃ = ∇f(X^{k−1}; ξ^k) needs the previous iterate.
        self.mvr = algorithm.momentum_form == "mvr"
        self.X_prev: TensorDict | None = None  # X^{k−1}, where the last gradient was taken (MVR)
        self.G_tilde: TensorDict = {}  # ∇f(X^{k−1}; ξ^k) of this round (MVR; 0 at the first round)
        # Each phase has its own codec and γ (gossip.v / gossip.x override gossip.codec / gamma);
        # a phase with identity and γ = 1 mixes exactly, any other runs on replicas.
        self.codecs: dict[str, Codec] = {ph: make_codec(gossip.codec_for(ph)) for ph in self.phases}
        self.gammas: dict[str, float] = {ph: gossip.gamma_for(ph) for ph in self.phases}
        self.exact_phase: dict[str, bool] = {ph: gossip.exact_for(ph) for ph in self.phases}
        self.keyframe_codec: Codec = make_codec(IdentityCodec())  # full replicas travel uncompressed
        # Running-sum tracker messages (docs/algorithms.md §8): phase V exact, a tracking method and a
        # static graph (with a time-varying one a sum would carry rounds not meant for a receiver).
        self.running_sums = (
            self.exact_phase.get("V", False)
            and self.rule.tracking
            and gossip.tracker == "running_sum"
            and len(self.views) == 1
        )
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
        # S = Σ_t U^t (float64, sent in phase V) and, per in-neighbour j, ρ_j = the last S_j used.
        self.S: TensorDict = self._zeros(SUM_DTYPE) if self.running_sums else {}
        self.rho: dict[int, TensorDict] = (
            {j: self._zeros(SUM_DTYPE) for j in senders} if self.running_sums else {}
        )
        self.rho_round: dict[int, int] = {}
        # A sender presumed gone (sums_down_after V messages lost in a row): its weight goes to self,
        # and B_j (float64) is what that borrowed, taken back if it comes back.
        self.sums_down_after = gossip.sums_down_after
        self.v_misses: dict[int, int] = {}
        self.B: dict[int, TensorDict] = {}
        # Compressed mode: R = Σ_t Ẑ^t of our own replica and of our copy of each in-neighbour's
        # (float64); a keyframe carries the sender's R so a receiver repairs the mass it missed.
        # Kept for the compressed phases only.
        self.replica_sums = not self.exact and gossip.tracker == "running_sum" and len(self.views) == 1
        sums = {j: self._zeros(SUM_DTYPE) for j in senders} if self.replica_sums else {}
        compressed = [ph for ph in self.phases if not self.exact_phase[ph]]
        self.R_self: dict[str, TensorDict] = (
            {ph: self._zeros(SUM_DTYPE) for ph in compressed} if self.replica_sums else {}
        )
        self.R: dict[str, dict[int, TensorDict]] = {
            ph: {j: dict(t) for j, t in sums.items()} for ph in compressed
        }
        # Self-centred clipping (docs/algorithms.md §8.1): this peer's own scale per phase, newest
        # last (‖Y − X‖ in phase X, ‖M‖ in phase V), the last clip_window of them; τ is
        # clip_multiple times their largest. The config admits it in exact mode only.
        self.clip = gossip.clip == "self_centred"
        self.clip_multiple = gossip.clip_multiple
        self.clip_window = gossip.clip_window
        self.own_updates: dict[str, list[float]] = {ph: [] for ph in self.phases}
        self.clipped = 0  # neighbour values the guard moved, over the run
        self._clipped_now: tuple[int, ...] = ()

    # ------------------------------------------------------------------ helpers
    @property
    def exact(self) -> bool:
        """Every phase of this peer mixes exactly (then no replicas and no keyframes)."""
        return all(self.exact_phase.values())

    @property
    def codec(self) -> Codec:
        """The codec of the peer's first phase (the one codec when both phases share it)."""
        return self.codecs[self.phases[0]]

    @property
    def gamma(self) -> float:
        """γ of the peer's first phase (the one γ when both phases share it)."""
        return self.gammas[self.phases[0]]

    def sends_keyframe(self, phase: str, keyframe: bool) -> bool:
        """Whether this round's message of ``phase`` is a full replica: a keyframe round, and a
        compressed phase (an exact phase has no replicas to resynchronise)."""
        return keyframe and not self.exact_phase[phase]

    def wire_codec(self, phase: str, keyframe: bool = False) -> str:
        """The codec kind the wire header of ``phase``'s message names (``identity`` for keyframes)."""
        return self.keyframe_codec.kind if keyframe else self.codecs[phase].kind

    def _zeros(self, dtype: torch.dtype | None = None) -> TensorDict:
        return {
            n: torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            for n, p in self.params.items()
        }

    def wire_dtype(self, phase: str) -> torch.dtype:
        """The dtype of this phase's payload: float64 running sums in phase V, else the model's."""
        return SUM_DTYPE if phase == "V" and self.running_sums else self.dtype

    def _initial_replica(self, phase: str) -> TensorDict:
        if phase == "X":
            return {n: p.detach().clone() for n, p in self.params.items()}
        return self._zeros()

    def view(self, k: int) -> PeerView:
        """This peer's row and column of the mixing matrix in round ``k`` (after any planned
        leave, the re-weighted live graph's)."""
        views = self._views_at(k)
        return views[k % len(views)]

    def _views_at(self, k: int) -> tuple[PeerView, ...]:
        """The views in force in round ``k``: the topology's, or the live graph's after leaves."""
        views = self.views
        for start, later in self.schedule:
            if k >= start:
                views = later
        return views

    def reschedule(self, schedule: Sequence[tuple[int, Sequence[PeerView]]]) -> None:
        """Set the views used from each round at which peers leave (a leave announced at run time
        adds one; rounds already mixed are not affected)."""
        self.schedule = tuple((r, tuple(vs)) for r, vs in sorted(schedule, key=lambda item: item[0]))

    def retire(self, j: int) -> None:
        """Neighbour ``j`` left for good: forget our copies of its replicas and their sums (the
        compressed phases), so that it is neither waited for nor mixed again."""
        for ph in list(self.hat):
            self.hat[ph].pop(j, None)
        for ph in list(self.R):
            self.R[ph].pop(j, None)
        self.stale = {(ph, i) for ph, i in self.stale if i != j}

    def handoff(self) -> TensorDict:
        """``V − M`` (float64): this peer's share of the trackers, for its heir when it leaves
        (the survivors' mean V = mean M needs it, docs/algorithms.md §8)."""
        return {n: (self.V[n].to(SUM_DTYPE) - self.M[n].to(SUM_DTYPE)).contiguous() for n in self.names}

    def inherit(self, share: Mapping[str, torch.Tensor]) -> None:
        """Take over a leaving neighbour's share of the trackers: ``V += share``."""
        self.V = {n: self.V[n] + share[n].to(self.device, self.dtype) for n in self.names}

    def X(self) -> TensorDict:
        """The current iterate (detached views of the model's parameters)."""
        return {n: p.detach() for n, p in self.params.items()}

    def lr(self, k: int) -> float:
        a = self.algorithm
        return optim.learning_rate(a.schedule, a.lr, k, self.setup.rounds)

    # ------------------------------------------------------------ who talks to whom
    def recipients(self, k: int, phase: str | None = None) -> tuple[int, ...]:
        """Out-neighbours of ``phase``'s message in round k (``None``: of any phase). With
        compression, every peer that ever mixes our replica gets every update (the union over the
        topology's period), so replicas never diverge."""
        if self.exact if phase is None else self.exact_phase[phase]:
            return self.view(k).out_neighbours
        return tuple(sorted({j for v in self._views_at(k) for j in v.out_neighbours}))

    def expected_senders(self, k: int, phase: str | None = None) -> tuple[int, ...]:
        """Whose ``phase`` message this peer uses in round k (``None``: of any phase)."""
        if self.exact if phase is None else self.exact_phase[phase]:
            return tuple(j for j, _ in self.view(k).in_neighbours)
        return tuple(sorted(self.hat[phase or self.phases[0]]))

    # ------------------------------------------------------------------ the round
    def gradient(self, k: int) -> float:
        """G ← ∇f_i(X; ξ_{i,k}) on this peer's batch for round k. Returns the loss."""
        self.round = k
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        batch = self.workload.train_batch(self.index, self.setup.n_peers, k)
        loss = self.workload.loss(self.model, batch)
        torch.autograd.backward(loss)
        self.G = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in self.params.items()
        }
        self.last_loss = float(loss.detach())
        if self.mvr:
            self._mvr_gradient(batch)
        return self.last_loss

    def _mvr_gradient(self, batch: Any) -> None:
        """``G̃ = ∇f(X^{k−1}; ξ^k)``: the gradient at the previous iterate on this round's batch
        (the same batch: batches are a pure function of (seed, peer, round)); 0 at the first round,
        so ``M^0 = G^0`` (STORM's start). Then X^k is remembered for the next round."""
        X_now = {n: p.detach().clone() for n, p in self.params.items()}
        if self.X_prev is None:
            self.G_tilde = self._zeros()
        else:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.X_prev[n])
            self.model.zero_grad(set_to_none=True)
            torch.autograd.backward(self.workload.loss(self.model, batch))
            self.G_tilde = {
                n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in self.params.items()
            }
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(X_now[n])
        self.X_prev = X_now

    def _pre_mix(self, phase: str, k: int) -> TensorDict:
        """U (phase V) or Y (phase X): the value this peer contributes to the mix."""
        if phase == "V":
            assert self.rule.tracker_update is not None, f"{self.rule.name} has no phase V"
            G_tilde = self.G_tilde if self.mvr else None
            self.M, U = algorithms.tracker_step(
                self.rule, self.M, self.V, self.G, self.algorithm.theta, G_tilde=G_tilde
            )
            return U
        a = self.algorithm
        D = algorithms.step_input(self.rule, self.V, self.G, a.theta, nesterov=a.nesterov)
        return self.rule.local_step(self.X(), D, self.lr(k), k, self.step_options)

    def message(self, phase: str, k: int, *, keyframe: bool = False) -> dict[str, Encoded]:
        """Form this phase's pre-mix value and encode what goes on the wire (once, for all).

        Exact mode: the value itself, or in phase V with running sums ``S += U`` and S itself.
        Compressed: ``q = C(Z − Ẑ_self)``, and ``Ẑ_self += decode(q)``, with the phase's codec.
        ``keyframe=True`` (compressed phases only; see :meth:`sends_keyframe`) sends the full
        updated replica ``Ẑ_self`` instead."""
        Z = self._pre_mix(phase, k)
        self._pending[phase] = Z
        if self.clip:
            self._record_own_update(phase, Z)
        codec = self.codecs[phase]
        if self.exact_phase[phase] and phase == "V" and self.running_sums:
            self.S = {n: self.S[n] + z.to(SUM_DTYPE) for n, z in Z.items()}
            return {n: codec.encode(s, seed=0) for n, s in self.S.items()}
        if self.exact_phase[phase]:
            return {n: codec.encode(z.contiguous(), seed=0) for n, z in Z.items()}
        hat = self.hat_self[phase]
        out: dict[str, Encoded] = {}
        for t, (n, z) in enumerate(Z.items()):
            enc = codec.encode(z - hat[n], seed=codec_seed(self.setup.seed, self.index, k, phase, t))
            hat[n] = hat[n] + codec.decode(enc, tuple(z.shape), z.dtype).to(self.device)
            out[n] = enc
        if self.replica_sums:
            R = self.R_self[phase]
            self.R_self[phase] = {n: R[n] + hat[n].to(SUM_DTYPE) for n in self.names}
        if keyframe:
            full = {n: self.keyframe_codec.encode(h, seed=0) for n, h in hat.items()}
            if self.replica_sums:
                full.update(
                    {
                        n + SUM_SUFFIX: self.keyframe_codec.encode(r, seed=0)
                        for n, r in self.R_self[phase].items()
                    }
                )
            return full
        return out

    def _record_own_update(self, phase: str, Z: TensorDict) -> None:
        """Remember this round's own scale of ``phase``: the local step ``‖Y_i − X_i‖`` in phase X,
        the momentum ``‖M_i‖`` in phase V (the honest spread of the trackers' running sums grows
        with it, not with one round's ``‖U − V‖``). Neither is what a neighbour sent, and a
        neighbour moves neither directly (``‖U_i‖`` would let it raise τ round after round)."""
        own = self.M if phase == "V" else {n: Z[n] - x for n, x in self.X().items()}
        norms = self.own_updates.setdefault(phase, [])
        norms.append(float(optim.global_norm(own)))
        del norms[: -self.clip_window]

    def tau(self, phase: str) -> float:
        """τ of the guard for ``phase`` this round (docs/algorithms.md §8.1)."""
        return optim.guard_threshold(self.own_updates.get(phase, []), self.clip_multiple)

    def _guard(self, Z: TensorDict, theirs: dict[int, TensorDict], tau: float) -> dict[int, TensorDict]:
        """Each neighbour's value moved to within τ of ``Z`` (``optim.clip_to``); counts who was moved."""
        out = {j: optim.clip_to(Z, z_j, tau) for j, z_j in theirs.items()}
        moved = tuple(j for j in out if any(out[j][n] is not theirs[j][n] for n in self.names))
        self._clipped_now += moved
        self.clipped += len(moved)
        return out

    def pending(self, phase: str) -> TensorDict:
        """The pre-mix value of ``phase`` (U or Y) between :meth:`message` and :meth:`mix`."""
        return dict(self._pending[phase])

    def decode(self, enc: Mapping[str, Encoded], phase: str, *, keyframe: bool = False) -> TensorDict:
        """Decode a peer's encoded message of ``phase`` as a receiver does (keyframes are
        identity-coded)."""
        codec = self.keyframe_codec if keyframe else self.codecs[phase]
        dtype = self.wire_dtype(phase)
        out = {}
        for n, e in enc.items():
            name = n.removesuffix(SUM_SUFFIX)
            out[n] = codec.decode(e, tuple(self.params[name].shape), SUM_DTYPE if name != n else dtype)
        return out

    def keyframe_tensors(self) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
        """Shapes and dtypes of a keyframe's tensors when they differ from a plain message's."""
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        if not self.replica_sums:
            return shapes, {}
        shapes.update({n + SUM_SUFFIX: tuple(p.shape) for n, p in self.params.items()})
        return shapes, {n + SUM_SUFFIX: SUM_DTYPE for n in self.names}

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
        tau = self.tau(phase) if self.clip else None
        self._clipped_now = ()
        if self.exact_phase[phase] and phase == "V" and self.running_sums:
            new, missing = self._mix_sums(view, k, Z, received, tau)
        elif self.exact_phase[phase]:
            new, missing = self._mix_exact(view, Z, received, tau)
        else:
            new, missing = self._mix_replicas(phase, view, Z, received, keyframes)
        if phase == "V":
            self.V = new
        else:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(new[n])
        return MixReport(
            phase,
            k,
            tuple(sorted(received)),
            missing,
            tuple(sorted(keyframes & set(received))),
            tuple(sorted(self._clipped_now)),
        )

    def _mix_exact(
        self,
        view: PeerView,
        Z: TensorDict,
        received: Mapping[int, Mapping[str, torch.Tensor]],
        tau: float | None = None,  # the guard's τ (docs/algorithms.md §8.1); None: off
    ) -> tuple[TensorDict, tuple[int, ...]]:
        missing = tuple(j for j, _ in view.in_neighbours if j not in received)
        w_self = view.self_weight + sum(w for j, w in view.in_neighbours if j in missing)
        out: TensorDict = {}
        if tau is not None:
            theirs = {
                j: {n: received[j][n].to(self.device) for n in self.names}
                for j, _ in view.in_neighbours
                if j in received
            }
            guarded = self._guard(Z, theirs, tau)
            for n, z in Z.items():
                terms = [(w_self, z)] + [(w, guarded[j][n]) for j, w in view.in_neighbours if j in guarded]
                out[n] = optim.mix(terms)
            return out, missing
        for n, z in Z.items():
            terms = [(w_self, z)]
            terms += [(w, received[j][n].to(self.device)) for j, w in view.in_neighbours if j in received]
            out[n] = optim.mix(terms)
        return out, missing

    def _mix_sums(
        self,
        view: PeerView,
        k: int,
        U: TensorDict,
        received: Mapping[int, Mapping[str, torch.Tensor]],
        tau: float | None = None,  # the guard's τ (docs/algorithms.md §8.1); None: off
    ) -> tuple[TensorDict, tuple[int, ...]]:
        """``V_i = w_ii U_i + Σ_j w_ij (S_j − ρ_j)`` over the senders that arrived, then ``ρ_j = S_j``.
        A missing sender contributes nothing now: its mass stays in flight (``S_j − ρ_j``) and
        arrives with its next message that gets through. Each round's S_j is used once.

        A sender missing ``gossip.sums_down_after`` rounds in a row (default 1: at once) lends its
        weight to self (``w_ij U_i``, so the row still sums to one and a neighbour gone for good
        costs no more than with the old policy); this peer remembers the loan in ``B_j`` and takes
        it back out of the first sum the sender delivers, so the mass still balances
        (docs/algorithms.md §8).

        With the guard on, the sum is clipped, not the increment: ``S_j`` is moved to within τ of the
        own ``S_i`` and ``ρ_j`` becomes the clipped sum, so a neighbour's whole cumulative effect
        through this link stays within ``w_ij τ`` of an honest one, and what the guard held back
        from an honest neighbour arrives once its sum is back inside (docs/algorithms.md §8.1)."""
        missing = tuple(j for j, _ in view.in_neighbours if j not in received)
        delta: dict[int, TensorDict] = {}
        repaid: dict[int, TensorDict] = {}
        borrowed: list[tuple[int, float]] = []
        for j, w in view.in_neighbours:
            if j in received and self.rho_round.get(j) != k:
                S_j = {n: received[j][n].to(self.device, SUM_DTYPE, copy=True) for n in self.names}
                if tau is not None:
                    S_j = self._guard(self.S, {j: S_j}, tau)[j]
                delta[j] = {n: (S_j[n] - self.rho[j][n]).to(self.dtype) for n in self.names}
                self.rho[j], self.rho_round[j] = S_j, k
                self.v_misses[j] = 0
                if j in self.B:
                    repaid[j] = {n: b.to(self.dtype) for n, b in self.B.pop(j).items()}
            elif j not in received:
                self.v_misses[j] = self.v_misses.get(j, 0) + 1
                if self.v_misses[j] >= self.sums_down_after:
                    borrowed.append((j, w))
        out: TensorDict = {}
        for n, u in U.items():
            terms = [(view.self_weight, u)] + [(w, delta[j][n]) for j, w in view.in_neighbours if j in delta]
            terms += [(w, u) for _, w in borrowed] + [(-1.0, repaid[j][n]) for j in sorted(repaid)]
            out[n] = optim.mix(terms)
        for j, w in borrowed:
            owed = self.B.setdefault(j, self._zeros(SUM_DTYPE))
            for n, u in U.items():
                owed[n] = owed[n] + w * u.to(SUM_DTYPE)
        return out, missing

    def _mix_replicas(
        self,
        phase: str,
        view: PeerView,
        Z: TensorDict,
        received: Mapping[int, Mapping[str, torch.Tensor]],
        keyframes: frozenset[int],
    ) -> tuple[TensorDict, tuple[int, ...]]:
        if self.replica_sums:
            return self._mix_replica_sums(phase, view, Z, received, keyframes)
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
            out[n] = optim.choco_mix(z, S, own[n], self.gammas[phase])
        return out, missing

    def _mix_replica_sums(
        self,
        phase: str,
        view: PeerView,
        Z: TensorDict,
        received: Mapping[int, Mapping[str, torch.Tensor]],
        keyframes: frozenset[int],
    ) -> tuple[TensorDict, tuple[int, ...]]:
        """C-DeMuon with loss repair (docs/algorithms.md §8): every copy Ẑ_j stays in the mix, even
        one that missed a correction q (it is then off by what it missed); each round adds the copy
        used to R_j; a keyframe sets the copy and adds ``γ w_ij (R_j(sender) − R_j(ours))``, the
        mass this peer's mix missed since the last keyframe, so no mass is lost for good."""
        hats, sums = self.hat[phase], self.R[phase]
        repair: dict[int, TensorDict] = {}
        for j in hats:
            payload = received.get(j)
            if payload is not None and j in keyframes:
                hats[j] = {n: payload[n].to(self.device).clone() for n in self.names}
            elif payload is not None:
                hats[j] = {n: hats[j][n] + payload[n].to(self.device) for n in self.names}
            else:
                self.stale.add((phase, j))  # its replica advanced without us, until a keyframe
            sums[j] = {n: sums[j][n] + hats[j][n].to(SUM_DTYPE) for n in self.names}
            if payload is not None and j in keyframes and (self.names[0] + SUM_SUFFIX) in payload:
                theirs = {
                    n: payload[n + SUM_SUFFIX].to(self.device, SUM_DTYPE, copy=True) for n in self.names
                }
                repair[j] = {n: theirs[n] - sums[j][n] for n in self.names}
                sums[j] = theirs
                self.stale.discard((phase, j))
        missing = tuple(j for j, _ in view.in_neighbours if j not in received)
        own = self.hat_self[phase]
        gamma = self.gammas[phase]
        out: TensorDict = {}
        for n, z in Z.items():
            S = optim.mix([(view.self_weight, own[n])] + [(w, hats[j][n]) for j, w in view.in_neighbours])
            new = optim.choco_mix(z, S, own[n], gamma)
            for j, w in view.in_neighbours:
                if j in repair:
                    new = new + (gamma * w * repair[j][n]).to(self.dtype)
            out[n] = new
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
            "S": _to_cpu(self.S),
            "rho": {j: _to_cpu(r) for j, r in self.rho.items()},
            "rho_round": dict(self.rho_round),
            "v_misses": dict(self.v_misses),
            "B": {j: _to_cpu(b) for j, b in self.B.items()},
            "R_self": {ph: _to_cpu(r) for ph, r in self.R_self.items()},
            "R": {ph: {j: _to_cpu(r) for j, r in rs.items()} for ph, rs in self.R.items()},
            "own_updates": {ph: list(v) for ph, v in self.own_updates.items()},
            "clipped": self.clipped,
            **({"X_prev": _to_cpu(self.X_prev)} if self.mvr and self.X_prev is not None else {}),
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
        self.S = dev(state.get("S", {}))
        self.rho = {int(j): dev(r) for j, r in state.get("rho", {}).items()}
        self.rho_round = {int(j): int(r) for j, r in state.get("rho_round", {}).items()}
        self.v_misses = {int(j): int(m) for j, m in state.get("v_misses", {}).items()}
        self.B = {int(j): dev(b) for j, b in state.get("B", {}).items()}
        self.R_self = {ph: dev(r) for ph, r in state.get("R_self", {}).items()} or self.R_self
        self.R = {
            ph: {int(j): dev(r) for j, r in rs.items()} for ph, rs in state.get("R", {}).items()
        } or self.R
        saved = state.get("own_updates", {})
        self.own_updates = {ph: [float(x) for x in saved.get(ph, [])] for ph in self.phases}
        self.clipped = int(state.get("clipped", 0))
        self.X_prev = dev(state["X_prev"]) if self.mvr and "X_prev" in state else None


def _to_cpu(d: TensorDict) -> TensorDict:
    return {n: t.detach().cpu().clone() for n, t in d.items()}
