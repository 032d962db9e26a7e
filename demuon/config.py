"""Settings: the one source of configuration (layer 1).

Every setting lives in a frozen pydantic model. A TOML file (``configs/*.toml``) is read into
:class:`Config`; ``DEMUON__SECTION__KEY=value`` environment variables (read by pydantic-settings; a section or
list is given as JSON) and ``--set key.sub=value`` overrides (TOML literals) are applied on top:
the environment wins over the file, ``--set`` wins over both. A bad value fails at load time
with a :class:`~demuon.errors.ConfigError` naming the field and value.

Algorithms, schedules, codecs and workloads are chosen by discriminated unions (``kind = ...`` /
``name = ...``), never by import strings (the ``custom`` workload names a ``module:function``
factory explicitly, which is the one place user code is plugged in).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core.core_schema import ValidationInfo
from pydantic_settings import EnvSettingsSource

from demuon.errors import ConfigError


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------------- topology

TopologyName = Literal[
    "complete",
    "ring",
    "torus",
    "hypercube",
    "exponential",
    "directed_exponential",
    "one_peer_exponential",
    "erdos_renyi",
    "random_geometric",
    "star",
    "edge_list",
]


class TopologyConfig(Frozen):
    """Who talks to whom. ``weights`` ``None`` means the topology's canonical weights
    (docs/algorithms.md §4.1: ring → Metropolis 1/3, hypercube → 1/(d+1), directed_exponential →
    the DeMuon authors' weights, ...)."""

    name: TopologyName = "ring"
    weights: Literal["metropolis", "max_degree", "lazy_metropolis", "lazy_max_degree"] | None = None
    p: float | None = Field(
        default=None, gt=0.0, le=1.0, validate_default=True, description="erdos_renyi edge probability"
    )
    radius: float | None = Field(
        default=None, gt=0.0, validate_default=True, description="random_geometric radius"
    )
    seed: int = 0
    rows: int | None = Field(default=None, ge=1, description="torus rows (cols = n / rows)")
    directed: bool = Field(default=False, description="exponential: Ying et al.'s directed arcs i → i+2^h")
    edges_file: Path | None = Field(
        default=None, validate_default=True, description="edge_list: a file of 'i j' or 'i j w' lines"
    )

    @field_validator("p", "radius", "edges_file", mode="after")
    @classmethod
    def _required_by_name(cls, v: Any, info: ValidationInfo) -> Any:
        """The option a topology cannot do without, named as the config spells it."""
        name, field = info.data.get("name"), str(info.field_name)
        if v is None and TOPOLOGY_NEEDS.get(str(name)) == field:
            raise ValueError(
                f"topology {name!r} needs topology.{field} (e.g. {TOPOLOGY_NEEDS_EXAMPLE[field]})"
            )
        return v


#: The one option each topology needs (``demuon.topology`` calls the edge list's ``path``).
TOPOLOGY_NEEDS = {"erdos_renyi": "p", "random_geometric": "radius", "edge_list": "edges_file"}
TOPOLOGY_NEEDS_EXAMPLE = {"p": "p = 0.5", "radius": "radius = 0.5", "edges_file": 'edges_file = "edges.txt"'}


# --------------------------------------------------------------------------------- schedules


class ConstantSchedule(Frozen):
    kind: Literal["constant"] = "constant"


class InvSqrtSchedule(Frozen):
    """η_k = η / √(k+1)."""

    kind: Literal["inv_sqrt"] = "inv_sqrt"


class LinearSchedule(Frozen):
    """η_k = η (1 − k/K), K = total rounds (DeMuon code's "linear")."""

    kind: Literal["linear"] = "linear"


class CosineSchedule(Frozen):
    """Linear warm-up over ``warmup`` rounds, then cosine decay to ``final_fraction`` · η."""

    kind: Literal["cosine"] = "cosine"
    warmup: int = Field(default=0, ge=0)
    final_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


Schedule = Annotated[
    ConstantSchedule | InvSqrtSchedule | LinearSchedule | CosineSchedule, Field(discriminator="kind")
]


# -------------------------------------------------------------------------------- algorithms

#: The algorithms a config may name; ``demuon.node.algorithms.REGISTRY`` has one row for each
#: (it refuses to import if the two disagree).
AlgorithmName = Literal["demuon", "dsgd", "dsgd_clip", "gt_dsgd", "gt_nsgdm"]
ALGORITHM_NAMES: tuple[str, ...] = get_args(AlgorithmName)

#: DSGD-Clip's threshold τ_k = CLIP_SCALE · max(k, 1)^CLIP_POWER (the DeMuon authors'
#: ``dsgd_gclip_decay``, docs/algorithms.md §3.2).
CLIP_SCALE = 0.1
CLIP_POWER = 0.4

#: The methods with DeMuon's EMA momentum M (and tracker V of it): the ones ``nesterov`` and
#: ``momentum_form`` apply to (``demuon.node.algorithms`` checks its registry against this).
MOMENTUM_ALGORITHMS: tuple[str, ...] = ("demuon", "gt_nsgdm")
#: torch.optim.Muon's ``adjust_lr_fn`` shape factors, ``none`` (DeMuon's own: no factor), and
#: ``scion``: Scion/Gluon's layer-wise LMO scales (√(d_out/d_in) spectral, 1/d_in sign).
AdjustLR = Literal["none", "original", "match_rms_adamw", "scion"]
MomentumForm = Literal["ema", "mvr"]

MatrixRoute = Literal["newton_schulz", "polar_svd"]
VectorRoute = Literal["normalize", "sign", "rms"]
EmbeddingRoute = Literal["newton_schulz", "colnorm", "rownorm", "sign"]


class RoutingConfig(Frozen):
    """How DeMuon orthogonalises each kind of parameter (docs/algorithms.md §2.4, §5.3).
    Defaults are paper-faithful: every ≥2-D tensor through Newton–Schulz, 1-D → V/‖V‖₂, 0-D → sign."""

    matrix: MatrixRoute = "newton_schulz"
    vector: VectorRoute = "normalize"
    embedding: EmbeddingRoute = "newton_schulz"
    head: EmbeddingRoute = "newton_schulz"
    embedding_names: tuple[str, ...] = ("embed", "wte", "wpe", "tok_emb", "pos_emb")
    head_names: tuple[str, ...] = ("lm_head", "head")
    ns_steps: int = Field(default=5, ge=1, le=20)
    ns_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )


class AlgorithmConfig(Frozen):
    name: AlgorithmName = "demuon"
    lr: float = Field(default=0.02, gt=0.0, description="η (peak step size)")
    theta: float = Field(default=0.2, gt=0.0, le=1.0, description="θ: EMA weight on the new gradient")
    schedule: Schedule = Field(default_factory=ConstantSchedule)
    clip_scale: float = Field(
        default=CLIP_SCALE, gt=0.0, description="dsgd_clip: τ_k = clip_scale · k^clip_power"
    )
    clip_power: float = Field(default=CLIP_POWER, ge=0.0)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # Muon's options (docs/algorithms.md §2.6); the defaults are DeMuon as the paper states it.
    nesterov: bool = Field(
        default=False, description="demuon, gt_nsgdm: step along the look-ahead θ·G + (1 − θ)·V (torch Muon)"
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, description="λ: decoupled weight decay, Y = (1 − η_k λ)·X − η_k·direction"
    )
    adjust_lr: AdjustLR = Field(
        default="none",
        description="demuon: step-size factor per orthogonalised A×B matrix: original √max(1, A/B), "
        "match_rms_adamw 0.2·√max(A, B) (torch's adjust_lr_fn), scion √(A/B) and 1/B on sign-routed "
        "matrices (Scion/Gluon's LMO scales)",
    )
    momentum_form: MomentumForm = Field(
        default="ema",
        description="demuon, gt_nsgdm: ema M = (1 − θ)M + θG, or mvr (STORM) "
        "M = G + (1 − θ)(M − ∇f(X_prev; same batch)), two gradients per round",
    )

    @model_validator(mode="after")
    def _muon_options_fit(self) -> AlgorithmConfig:
        """Each Muon option only with the methods it means something for, and a decay factor
        ``1 − η λ`` that stays positive."""
        with_momentum = f"a method with momentum ({', '.join(MOMENTUM_ALGORITHMS)}), not {self.name!r}"

        def side_by_side(field: str, off: str) -> str:
            return f"; set per_algorithm.{self.name}.{field} = {off} to run {self.name} beside it"

        if self.nesterov and self.name not in MOMENTUM_ALGORITHMS:
            raise ValueError(
                f"algorithm.nesterov = true needs {with_momentum}" + side_by_side("nesterov", "false")
            )
        if self.momentum_form != "ema" and self.name not in MOMENTUM_ALGORITHMS:
            raise ValueError(
                f"algorithm.momentum_form = {self.momentum_form!r} needs {with_momentum}"
                + side_by_side("momentum_form", '"ema"')
            )
        if self.adjust_lr != "none" and self.name != "demuon":
            raise ValueError(
                f"algorithm.adjust_lr = {self.adjust_lr!r} scales orthogonalised matrices and needs "
                f"demuon, not {self.name!r}" + side_by_side("adjust_lr", '"none"')
            )
        if self.lr * self.weight_decay >= 1.0:
            raise ValueError(
                f"algorithm.weight_decay = {self.weight_decay} with lr = {self.lr}: lr · weight_decay "
                "must be below 1 (the decay factor 1 − lr · weight_decay must stay positive)"
            )
        return self


# ------------------------------------------------------------------------------------ codecs


class IdentityCodec(Frozen):
    kind: Literal["identity"] = "identity"


class CastCodec(Frozen):
    kind: Literal["cast"] = "cast"
    dtype: Literal["bfloat16", "float16"] = "bfloat16"


class TopKCodec(Frozen):
    kind: Literal["topk"] = "topk"
    ratio: float = Field(default=0.1, gt=0.0, le=1.0, description="fraction of entries kept")


class RandKCodec(Frozen):
    kind: Literal["randk"] = "randk"
    ratio: float = Field(default=0.1, gt=0.0, le=1.0)


class RankKCodec(Frozen):
    kind: Literal["rankk"] = "rankk"
    rank: int = Field(default=4, ge=1)
    power_iters: int = Field(default=2, ge=0, le=10)


class NaturalCodec(Frozen):
    kind: Literal["natural"] = "natural"


class Int8Codec(Frozen):
    kind: Literal["int8"] = "int8"
    per_row: bool = False
    deflate: bool = Field(
        default=False, description="DEFLATE the codes (lossless; about 0.64 of the bytes on trackers)"
    )


class BlockQuantCodec(Frozen):
    """Block-wise 4/2/1-bit quantization with a float32 scale per block (``transport.codecs.BlockQuant``).
    Suggested ``gossip.gamma``: 1.0 (4 bits), 0.4 (2 bits), 0.6 (1 bit); stochastic 1.0 / 0.5 / 0.1
    (``codecs.BLOCKQ_GAMMA``, docs/algorithms.md §7)."""

    kind: Literal["blockq"] = "blockq"
    bits: Literal[1, 2, 4] = 4
    block: int = Field(default=256, ge=8, multiple_of=8, description="entries per scale (a multiple of 8)")
    stochastic: bool = Field(default=False, description="unbiased stochastic rounding (scaled per block)")


CodecConfig = Annotated[
    IdentityCodec
    | CastCodec
    | TopKCodec
    | RandKCodec
    | RankKCodec
    | NaturalCodec
    | Int8Codec
    | BlockQuantCodec,
    Field(discriminator="kind"),
]


PHASES: tuple[str, ...] = ("V", "X")


class PhaseGossip(Frozen):
    """``[gossip.v]`` / ``[gossip.x]``: the codec and γ of one phase's message (V: the trackers,
    X: the parameters), each overriding ``[gossip]``'s ``codec`` / ``gamma`` when given."""

    codec: CodecConfig | None = None
    gamma: float | None = Field(default=None, gt=0.0, le=1.0, description="γ of this phase")


class GossipConfig(Frozen):
    """How messages are compressed. ``codec`` and ``gamma`` apply to both phases unless
    ``[gossip.v]`` / ``[gossip.x]`` override them. A phase with ``identity`` and γ = 1 mixes exactly
    (Σ_j w_ij Z_j); otherwise it runs C-DeMuon Option A (docs/algorithms.md §6) with its own γ."""

    codec: CodecConfig = Field(default_factory=IdentityCodec)
    gamma: float = Field(default=1.0, gt=0.0, le=1.0, description="γ: CHOCO consensus step")
    v: PhaseGossip | None = Field(default=None, description="phase V (trackers): codec / gamma overrides")
    x: PhaseGossip | None = Field(default=None, description="phase X (parameters): codec / gamma overrides")
    keyframe_every: int = Field(
        default=50, ge=0, description="compressed only: send a full replica every N rounds (0 = never)"
    )
    tracker: Literal["running_sum", "self_weight"] = Field(
        default="running_sum",
        description="exact mode, phase V: running sums (a lost message's mass arrives with the next one) or "
        "the old policy (a missing neighbour's weight goes to self, and its mass is lost)",
    )
    sums_down_after: int = Field(
        default=1,
        ge=1,
        description="running sums: after this many tracker messages lost in a row from one neighbour, "
        "its weight goes to self until it is heard again (then what that lent is taken back)",
    )
    clip: Literal["off", "self_centred"] = Field(
        default="off",
        description="exact mode: self_centred replaces each neighbour's value Z_j by "
        "Z_i + clip(Z_j − Z_i, τ), a guard against poisoned values from an authenticated neighbour "
        "(ClippedGossip, docs/algorithms.md §8.1); it changes fault-free results, so it is off by default",
    )
    clip_multiple: float = Field(
        default=2.0,
        gt=0.0,
        description="self_centred: τ = clip_multiple × the largest of this peer's own ‖Y_i − X_i‖ "
        "(phase X) or ‖M_i‖ (phase V, where the running sums S_j are clipped against S_i) over the last "
        "clip_window rounds",
    )
    clip_window: int = Field(default=10, ge=1, description="self_centred: rounds the τ rule looks back over")

    def _override(self, phase: str) -> PhaseGossip | None:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is not one of {list(PHASES)}")
        return self.v if phase == "V" else self.x

    def codec_for(self, phase: str) -> CodecConfig:
        """The codec of ``phase``'s message ("V" or "X"): its override, else ``codec``."""
        over = self._override(phase)
        return over.codec if over is not None and over.codec is not None else self.codec

    def gamma_for(self, phase: str) -> float:
        """γ of ``phase``: its override, else ``gamma``."""
        over = self._override(phase)
        return over.gamma if over is not None and over.gamma is not None else self.gamma

    def exact_for(self, phase: str) -> bool:
        """Whether ``phase`` mixes exactly (identity codec and γ = 1)."""
        return self.codec_for(phase).kind == "identity" and self.gamma_for(phase) == 1.0

    def field_of(self, phase: str, key: Literal["codec", "gamma"]) -> str:
        """The dotted name of the setting that gives ``phase`` its ``key`` (for error messages)."""
        over = self._override(phase)
        return (
            f"gossip.{phase.lower()}.{key}"
            if over is not None and getattr(over, key) is not None
            else f"gossip.{key}"
        )

    @property
    def exact(self) -> bool:
        """Both phases mix exactly (no replicas, no keyframes)."""
        return all(self.exact_for(ph) for ph in PHASES)

    def not_exact_reason(self) -> str:
        """Which setting makes a phase compressed (empty when both are exact)."""
        for ph in PHASES:
            if not self.exact_for(ph):
                codec, gamma = self.codec_for(ph), self.gamma_for(ph)
                if codec.kind != "identity":
                    return f"{self.field_of(ph, 'codec')} is {codec.kind!r}"
                return f"{self.field_of(ph, 'gamma')} is {gamma}"
        return ""

    @model_validator(mode="after")
    def _clip_needs_exact_mixing(self) -> GossipConfig:
        if self.clip != "off" and not self.exact:
            raise ValueError(
                "gossip.clip = self_centred needs exact mixing in both phases (identity codec, gamma = 1); "
                + self.not_exact_reason()
            )
        return self


# ------------------------------------------------------------------------------------ faults

FaultActionName = Literal["drop", "delay", "duplicate", "reorder", "corrupt"]
PhaseName = Literal["V", "X"]


def _round_range(v: tuple[int, int] | None) -> tuple[int, int] | None:
    if v is not None and not 0 <= v[0] <= v[1]:
        raise ValueError(f"expected [first, last] with 0 <= first <= last, got {list(v)}")
    return v


class LinkFault(Frozen):
    """Messages on the matching links meet ``action`` with ``probability``; every filter but
    ``action`` is optional (all senders, receivers, rounds, phases)."""

    action: FaultActionName
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    phases: tuple[PhaseName, ...] | None = None
    src: tuple[int, ...] | None = Field(default=None, description="sending peers")
    dst: tuple[int, ...] | None = Field(default=None, description="receiving peers")
    rounds: tuple[int, int] | None = Field(default=None, description="[first, last] round, inclusive")
    delay: int = Field(default=1, ge=1, description="delay/reorder: later messages that overtake it")
    copies: int = Field(default=1, ge=1, description="duplicate: extra copies")

    _rounds = field_validator("rounds")(classmethod(lambda cls, v: _round_range(v)))


class PartitionFault(Frozen):
    """During ``rounds`` no message crosses between ``groups`` (peers in no group are cut off)."""

    groups: tuple[tuple[int, ...], ...] = Field(min_length=2)
    rounds: tuple[int, int]

    _rounds = field_validator("rounds")(classmethod(lambda cls, v: _round_range(v)))

    @model_validator(mode="after")
    def _disjoint(self) -> PartitionFault:
        seen: set[int] = set()
        for g in self.groups:
            if seen & set(g):
                raise ValueError(f"groups overlap in {sorted(seen & set(g))}")
            seen |= set(g)
        return self


class PeerFault(Frozen):
    """What happens to one peer: a crash (SIGKILL by ``demuon launch`` at the start of
    ``crash_at``, restarted with ``--resume`` after ``restart_after_s`` unless that is omitted) or
    an announced, permanent leave at the start of ``leave_at``."""

    id: int = Field(ge=0)
    crash_at: int | None = Field(default=None, ge=0)
    restart_after_s: float | None = Field(default=None, ge=0.0)
    leave_at: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_fate(self) -> PeerFault:
        if self.crash_at is None and self.leave_at is None:
            raise ValueError(f"peer {self.id}: give crash_at or leave_at")
        if self.crash_at is not None and self.leave_at is not None:
            raise ValueError(f"peer {self.id}: crash_at and leave_at exclude each other")
        if self.restart_after_s is not None and self.crash_at is None:
            raise ValueError(f"peer {self.id}: restart_after_s needs crash_at")
        return self


class FaultsConfig(Frozen):
    """A fault plan (``[faults]`` in a cluster file, or its own file for ``--faults``). Every
    decision is keyed on (seed, sender, receiver, round, phase), never on the clock, so a run
    replays exactly; the simulator and the daemon decide the same fates."""

    seed: int = 0
    link: tuple[LinkFault, ...] = ()
    partition: tuple[PartitionFault, ...] = ()
    peer: tuple[PeerFault, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.link or self.partition or self.peer)


# --------------------------------------------------------------------------------- workloads


class QuadraticWorkload(Frozen):
    """Heterogeneous least squares f_i(X) = ½‖A_i X − B_i‖²/rows: a different minimiser per peer."""

    kind: Literal["quadratic"] = "quadratic"
    rows: int = Field(default=64, ge=1, description="samples per peer")
    dim_in: int = Field(default=16, ge=1)
    dim_out: int = Field(default=8, ge=1)
    heterogeneity: float = Field(default=1.0, ge=0.0, description="spread of the per-peer minimisers")
    noise: float = Field(default=0.0, ge=0.0, description="scale of additive gradient noise")
    noise_df: float | None = Field(default=None, gt=1.0, description="Student-t dof (None = Gaussian)")
    batch_size: int | None = Field(default=None, ge=1, description="None = full batch")


class LogisticWorkload(Frozen):
    kind: Literal["logistic"] = "logistic"
    samples: int = Field(default=256, ge=1, description="samples per peer")
    features: int = Field(default=20, ge=1)
    classes: int = Field(default=4, ge=2)
    heterogeneity: float = Field(default=1.0, ge=0.0)
    batch_size: int = Field(default=32, ge=1)


class GptWorkload(Frozen):
    """Character-level (byte-level) GPT shaped like the DeMuon experiments, smaller by default."""

    kind: Literal["gpt"] = "gpt"
    d_model: int = Field(default=64, ge=8)
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=4, ge=1)
    d_ff: int | None = Field(default=None, ge=8, description="None = 4·d_model")
    context: int = Field(default=64, ge=2)
    batch_size: int = Field(default=16, ge=1)
    corpus: Path | None = Field(default=None, description="text file or folder; None = Python stdlib")
    corpus_bytes: int = Field(default=1_000_000, ge=10_000)
    shard: Literal["iid", "contiguous"] = "iid"
    val_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)
    val_batches: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> GptWorkload:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


class CustomWorkload(Frozen):
    kind: Literal["custom"] = "custom"
    factory: str = Field(description="'package.module:function' returning a Workload")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        mod, sep, fn = v.partition(":")
        if not sep or not mod or not fn:
            raise ValueError(f"expected 'module:function', got {v!r}")
        return v


WorkloadConfig = Annotated[
    QuadraticWorkload | LogisticWorkload | GptWorkload | CustomWorkload, Field(discriminator="kind")
]


# ------------------------------------------------------------------------- cluster / daemon


#: One label of a host name (RFC 1123; ``_`` too, as container runtimes allow it in names).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def is_host(text: str) -> bool:
    """An IPv4 or IPv6 address (no brackets) or a host name. A name whose last label is all
    digits (``256.1.1.1``, ``10.0.0``) is refused: it is a mistyped address, not a name."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _check_host(text: str) -> str:
    if not is_host(text):
        raise ValueError("not an IPv4/IPv6 address or host name")
    return text


def _check_endpoint(text: str) -> str:
    """``tcp://HOST:PORT`` is checked (an IPv6 host with or without brackets, as ZeroMQ reads
    both); an endpoint of another ZeroMQ transport (``ipc://PATH``, ...) only for its form."""
    scheme, sep, address = text.partition("://")
    if not sep or not scheme or not address:
        raise ValueError("expected a ZeroMQ endpoint such as tcp://HOST:PORT")
    if scheme != "tcp":
        return text
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise ValueError("expected tcp://HOST:PORT")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number in 1..65535")
    bracketed = host.startswith("[") and host.endswith("]") and ":" in host  # [IPv6]
    if not is_host(host[1:-1] if bracketed else host):
        raise ValueError(f"host {host!r} is not an IPv4/IPv6 address or host name")
    return text


class PeerEndpoint(Frozen):
    id: int = Field(ge=0)
    endpoint: str = Field(description="ZeroMQ endpoint the peer binds, e.g. tcp://127.0.0.1:7000")
    public_key: str | None = Field(default=None, description="Z85 CURVE public key (security on)")

    _valid_endpoint = field_validator("endpoint")(classmethod(lambda cls, v: _check_endpoint(v)))


class NetworkConfig(Frozen):
    """Where peers listen. If ``peers`` is empty, peer i binds ``tcp://{host}:{base_port + i}``."""

    host: str = Field(default="127.0.0.1", description="IPv4/IPv6 address or host name")
    _valid_host = field_validator("host")(classmethod(lambda cls, v: _check_host(v)))
    base_port: int = Field(default=27300, ge=1024, le=65000)
    peers: tuple[PeerEndpoint, ...] = ()
    phase_timeout_s: float = Field(default=10.0, gt=0.0, description="deadline of one gossip phase")
    down_after_misses: int = Field(default=3, ge=1, description="K consecutive misses → neighbour down")
    start_timeout_s: float = Field(default=30.0, gt=0.0, description="wait for neighbours at start")
    hwm: int = Field(default=1000, ge=1)
    on_sigterm: Literal["stop", "leave"] = Field(
        default="stop",
        description="stop: checkpoint and exit (resume later); leave: hand the tracker share to a "
        "neighbour, tell the others, exit for good",
    )
    resend_s: float = Field(
        default=1.0,
        ge=0.0,
        description="a wait this long sends the last messages again, then after 2×, 4× … as long "
        "(0 = never); on slow links set it above the time a round's messages take to send",
    )
    leave_notice_rounds: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="a leave asked for at run time happens this many rounds later, announced in every "
        "header so the survivors re-weight from the same round (0: at once, neighbours lend its weight)",
    )
    heartbeat_ms: int = Field(
        default=1000,
        ge=0,
        description="ZMTP heartbeat of the outgoing links (0 = off; never on the listener)",
    )
    reject_budget: int = Field(
        default=100,
        ge=1,
        description="rejected messages from one sender within mute_s before it is ignored for mute_s",
    )
    mute_s: float = Field(
        default=30.0, gt=0.0, description="how long a sender over its reject budget is ignored"
    )


class SecurityConfig(Frozen):
    """CURVE on every link. Left unset, ``launch`` and ``compose`` generate keys for the cluster
    and turn it on, and ``run`` goes without only when every endpoint it binds or reaches is
    loopback; ``false`` turns it off explicitly (any process that reaches a port can then steer the
    run: README, "Security")."""

    enabled: bool | None = Field(
        default=None,
        description="CURVE on every link (unset: on for launch and compose, keys generated; run "
        "refuses a non-loopback endpoint without it)",
    )
    key_dir: Path | None = Field(default=None, description="folder with peer-<id>.key_secret files")


class CheckpointConfig(Frozen):
    dir: Path | None = None
    every: int = Field(default=0, ge=0, description="every N rounds (0 = only on shutdown)")


class TelemetryConfig(Frozen):
    """MQTT telemetry and remote control (README, "Telemetry (MQTT)"). The password is a
    ``SecretStr``: never logged, shown as ``**********`` in a repr or a JSON dump; it may come from
    ``DEMUON__TELEMETRY__PASSWORD`` instead of the file."""

    mqtt_host: str | None = None
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = Field(default="demuon", pattern=r"^[^#+]+$", description="no MQTT wildcards")
    run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="run name in every payload (unset: the first 12 hex digits of the config's math "
        "fingerprint, the same on every peer of a cluster)",
    )
    username: str | None = None
    password: SecretStr | None = Field(default=None, description="or DEMUON__TELEMETRY__PASSWORD")
    tls: bool = Field(default=False, description="TLS to the broker (system CAs unless tls_ca)")
    tls_ca: Path | None = Field(default=None, description="CA bundle (PEM) of the broker's certificate")
    qos: int = Field(default=1, ge=0, le=2, description="QoS of the metrics rows (status and replies: 1)")
    status_every_s: float = Field(
        default=2.0, gt=0.0, description="at most this often a status refresh carries the new round"
    )

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> TelemetryConfig:
        if self.tls_ca is not None and not self.tls:
            raise ValueError("telemetry.tls_ca is set but telemetry.tls = false: set tls = true")
        if self.password is not None and self.username is None:
            raise ValueError("telemetry.password is set without telemetry.username")
        return self

    prometheus_port: int | None = Field(
        default=None,
        ge=0,
        le=65000,
        description="Prometheus metrics: peer i serves http://{prometheus_host}:{port + i}/metrics "
        "(unset = off; 0 = each peer picks a free port and logs it)",
    )
    prometheus_host: str = Field(default="127.0.0.1", description="address the metrics endpoint binds")
    _valid_prometheus_host = field_validator("prometheus_host")(classmethod(lambda cls, v: _check_host(v)))


# ---------------------------------------------------------------------------------- the root


class Config(Frozen):
    """One experiment or cluster. ``simulate`` and ``run``/``launch`` read the same file."""

    peers: int = Field(default=8, ge=1, le=4096, description="N, number of peers")
    rounds: int = Field(default=100, ge=1)
    seed: int = 0
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "float64"] = Field(
        default="float32", description="parameter/state dtype (float64 for reference checks)"
    )
    threads: int = Field(default=1, ge=1, description="torch threads per peer")
    eval_every: int = Field(default=10, ge=1, description="validation of the averaged model every N rounds")
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    gossip: GossipConfig = Field(default_factory=GossipConfig)
    workload: WorkloadConfig = Field(default_factory=QuadraticWorkload)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    per_algorithm: dict[AlgorithmName, dict[str, Any]] = Field(
        default_factory=dict,
        description="algorithm-section overrides applied when that algorithm runs (e.g. its own lr)",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")

    @model_validator(mode="after")
    def _endpoints_match_peers(self) -> Config:
        if self.network.peers:
            ids = sorted(p.id for p in self.network.peers)
            if ids != list(range(self.peers)):
                raise ValueError(f"network.peers ids {ids} must be exactly 0..{self.peers - 1}")
        return self

    @model_validator(mode="after")
    def _faults_name_real_peers(self) -> Config:
        f = self.faults
        named = [("faults.peer.id", p.id) for p in f.peer]
        named += [("faults.partition.groups", i) for p in f.partition for g in p.groups for i in g]
        named += [
            (f"faults.link.{side}", i)
            for lf in f.link
            for side in ("src", "dst")
            for i in getattr(lf, side) or ()
        ]
        for where, i in named:
            if not 0 <= i < self.peers:
                raise ValueError(f"{where}: peer {i} is not in 0..{self.peers - 1}")
        return self

    def for_algorithm(self, name: str) -> Config:
        """This config with ``algorithm.name = name`` and that algorithm's ``per_algorithm`` overrides."""
        section = {**self.algorithm.model_dump(), **self.per_algorithm.get(name, {}), "name": name}  # type: ignore[call-overload]
        data = self.model_dump()
        data["algorithm"] = section
        return config_from_dict(data)

    def endpoint(self, peer: int) -> str:
        """The endpoint peer ``peer`` binds."""
        for p in self.network.peers:
            if p.id == peer:
                return p.endpoint
        return f"tcp://{self.network.host}:{self.network.base_port + peer}"


#: Settings that may differ between the run that saved a checkpoint and the one that resumes it
#: (where files go, how the network and telemetry are reached, threads, device, injected faults):
#: they do not change the mathematics of the run.
RUN_LOCAL_FIELDS = (
    "checkpoint",
    "network",
    "telemetry",
    "security",
    "threads",
    "device",
    "eval_every",
    "faults",  # the environment a run met, not its mathematics: resume without (or with) a plan
)


def math_fingerprint(config: Config) -> str:
    """sha256 of the config's JSON without :data:`RUN_LOCAL_FIELDS` (keys sorted): two configs
    with the same fingerprint compute the same run, so a checkpoint of one resumes the other."""
    data = config.model_dump(mode="json")
    for name in RUN_LOCAL_FIELDS:
        data.pop(name, None)
    for phase in ("v", "x"):  # absent per-phase overrides: the fingerprint configs had before them
        if data["gossip"].get(phase) is None:
            data["gossip"].pop(phase, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------- loading

ENV_PREFIX = "DEMUON__"


def parse_value(text: str) -> Any:
    """A ``--set``/environment value: a TOML literal if it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assign(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(dotted, value, "empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, value, f"{part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


class _ConfigEnvironment(EnvSettingsSource):
    """pydantic-settings' environment source for :class:`Config`, reading a given mapping (the
    process environment by default) so tests can pass their own."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(
            Config,  # type: ignore[arg-type]  # a plain model works: only its fields are read
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _sections(annotation: Any) -> list[type[BaseModel]] | None:
    """The models a field's value may be (several for a discriminated union); None when the
    field is a mapping whose keys are free (``per_algorithm``); ``[]`` for a plain value."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _sections(get_args(annotation)[0])
    if origin is dict:
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin in (Union, UnionType):
        found: list[type[BaseModel]] = []
        for arg in get_args(annotation):
            sub = _sections(arg)
            if sub is None:
                return None
            found += sub
        return found
    return []


def _unknown_env_name(name: str) -> str | None:
    """Why the variable ``name`` (``DEMUON__…``) names no setting of :class:`Config`, or None
    when it names one: every ``__``-separated part must be a field of the section before it."""
    parts = name[len(ENV_PREFIX) :].lower().split("__")
    models: list[type[BaseModel]] = [Config]
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not models:
            whole = f"{ENV_PREFIX}{'__'.join(parts[:depth]).upper()}"
            return f"{where} is a value, not a section, so it has no {part!r} (set it whole: {whole}=...)"
        fields: dict[str, Any] = {f: info.annotation for m in models for f, info in m.model_fields.items()}
        if part not in fields:
            section = f"section [{where}]" if where else "the top level"
            close = difflib.get_close_matches(part, fields, n=1)
            meant = "__".join([*parts[:depth], *close[:1], *parts[depth + 1 :]]).upper()
            hint = f"; did you mean {ENV_PREFIX}{meant}?" if close else ""
            return f"no setting {part!r} in {section} (variables are {ENV_PREFIX}SECTION__KEY){hint}"
        sub = _sections(fields[part])
        if sub is None:  # free keys below (per_algorithm.NAME.key): checked when the config validates
            return None
        models = sub
    return None


def check_env_names(environ: Mapping[str, str]) -> None:
    """Every ``DEMUON__…`` variable must name a setting: a misspelt one (``DEMUON__ALGORITM__LR``)
    fails like an unknown TOML key, naming the variable, instead of being ignored."""
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX):
            reason = _unknown_env_name(name)
            if reason is not None:
                raise ConfigError(name, environ[name], reason)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``DEMUON__ALGORITHM__LR=0.1`` → ``{"algorithm": {"lr": "0.1"}}`` (nested by ``__``; a JSON
    value sets a whole section or list, e.g. ``DEMUON__NETWORK__PEERS='[{"id": 0, ...}]'``). A
    variable that names no setting is a :class:`ConfigError` (:func:`check_env_names`)."""
    env = os.environ if environ is None else environ
    check_env_names(env)
    return dict(_ConfigEnvironment(env)())


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict; a failure becomes a ConfigError naming the first bad field and value."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        reason = err["msg"].removeprefix("Value error, ")  # a validator's own words
        if not field:  # a check across sections: its message names the fields itself
            raise ConfigError("", None, reason) from exc
        raise ConfigError(field, err.get("input"), reason) from exc


def _read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict. A file that cannot be read, is not UTF-8 or not TOML is a
    ConfigError naming it (``what``: the option that named it) and saying why."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(what, str(p), "no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(what, str(p), "is a directory, not a file") from exc
    except OSError as exc:
        raise ConfigError(what, str(p), f"cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        reason = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}), so not a TOML file"
        raise ConfigError(what, str(p), reason) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(what, str(p), f"not valid TOML: {exc}") from exc


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    faults: str | Path | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Read ``path`` (TOML; None = all defaults), then environment, then ``key=value`` overrides;
    ``faults`` names a fault-plan file that replaces the config's ``[faults]``."""
    data: dict[str, Any] = _read_toml(path, "config") if path is not None else {}
    if faults is not None:
        data["faults"] = _read_toml(faults, "--faults")
    data = _merge(data, env_overrides(environ))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "expected key=value")
        _assign(data, key.strip(), parse_value(text.strip()))
    return config_from_dict(data)
