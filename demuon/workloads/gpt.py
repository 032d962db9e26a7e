"""Byte-level GPT shaped like the DeMuon experiments (docs/algorithms.md §10), small enough for a CPU.

    model  tok_emb (256 × d) + pos_emb (context × d, learned)
           n_layers pre-LN blocks:  x ← x + attn(LN₁ x);  x ← x + mlp(LN₂ x)
               attn: causal multi-head self-attention, separate q/k/v/out d × d projections
               mlp:  d → d_ff → d with GELU (d_ff = 4·d by default)
           ln_f, then lm_head (d → 256, no bias); loss = next-byte cross-entropy
    data   a byte corpus (see ``corpus``): the last ``val_fraction`` of the bytes is validation;
           a training window is ``context + 1`` consecutive training bytes (inputs, shifted targets)
           "iid":        all window start positions shuffled with the workload seed and dealt
                         round-robin to the peers (every peer sees the whole corpus)
           "contiguous": peer i gets the i-th of N equal contiguous chunks (heterogeneous)
    batch  ``batch_size`` windows drawn from the peer's shard, from a generator seeded by
           (workload seed, peer, k); validation averages ``val_batches`` fixed batches of
           evenly spaced windows of the validation bytes.

Differences from the authors' MiniGPT (documented on purpose): bytes instead of a word vocabulary
built from Multi30k (so the vocabulary does not depend on the corpus); pre-LN blocks written out
instead of post-LN ``nn.TransformerDecoderLayer`` (whose cross-attention to "memory" is dropped);
separate q/k/v matrices (Muon orthogonalises each) instead
of one fused ``in_proj_weight``; GELU; no dropout (deterministic). Weights are initialised
GPT-2 style from a local generator: N(0, 0.02²), residual output projections N(0, 0.02²/(2·n_layers)),
biases 0, LayerNorm 1/0.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demuon.config import GptWorkload
from demuon.errors import WorkloadError
from demuon.workloads.base import DTYPE, check_peer, evaluate, generator
from demuon.workloads.corpus import as_tensor, load_corpus

VOCAB = 256  # bytes: fixed, whatever the corpus
INIT_STD = 0.02  # GPT-2 initialisation scale


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions ≤ t."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, dtype=DTYPE)
        self.k_proj = nn.Linear(d_model, d_model, dtype=DTYPE)
        self.v_proj = nn.Linear(d_model, d_model, dtype=DTYPE)
        self.out_proj = nn.Linear(d_model, d_model, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        shape = (B, T, self.n_heads, C // self.n_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.out_proj(y.transpose(1, 2).reshape(B, T, C))
        return out


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, dtype=DTYPE)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model, dtype=DTYPE)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(d_model, d_ff, dtype=DTYPE))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(d_ff, d_model, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class MiniGPT(nn.Module):
    """Byte-level GPT: ``forward(idx)`` maps (B, T ≤ context) byte ids to (B, T, 256) logits."""

    def __init__(self, *, d_model: int, n_layers: int, n_heads: int, d_ff: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(VOCAB, d_model, dtype=DTYPE)
        self.pos_emb = nn.Embedding(context, d_model, dtype=DTYPE)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, dtype=DTYPE)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False, dtype=DTYPE)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.lm_head(self.ln_f(x))
        return logits


def init_gpt(model: MiniGPT, g: torch.Generator, n_layers: int) -> None:
    """GPT-2 initialisation drawn from ``g`` in module order (``model`` modified in place)."""
    residual_std = INIT_STD / math.sqrt(2 * n_layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, INIT_STD, generator=g)
            elif isinstance(module, nn.Linear):
                residual = name.endswith(("out_proj", "mlp.proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if residual else INIT_STD, generator=g)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


@functools.lru_cache(maxsize=4)
def iid_permutation(seed: int, n_windows: int) -> torch.Tensor:
    """The shuffled training-window start positions (CPU, int64), shared by every peer."""
    return torch.randperm(n_windows, generator=generator(seed, "gpt/iid"))


class ByteLanguageModel:
    """The ``gpt`` workload (see the module docstring)."""

    def __init__(self, cfg: GptWorkload, *, seed: int, device: torch.device) -> None:
        self.cfg = cfg
        self.seed = seed
        self.device = torch.device(device)
        self.d_ff = cfg.d_ff if cfg.d_ff is not None else 4 * cfg.d_model
        where = str(cfg.corpus) if cfg.corpus is not None else "the Python standard library"
        data = as_tensor(load_corpus(cfg.corpus, cfg.corpus_bytes), self.device)
        n_val = int(data.numel() * cfg.val_fraction)
        self.n_train = data.numel() - n_val
        span = cfg.context + 1
        if n_val < span or self.n_train < span:
            raise WorkloadError(
                f"corpus {where} has {data.numel()} bytes: too few for windows of {span} bytes "
                f"in both training ({self.n_train}) and validation ({n_val})",
                value=cfg.corpus,
            )
        self.data = data
        self._offsets = torch.arange(span, device=self.device)
        count = cfg.val_batches * cfg.batch_size
        starts = torch.linspace(0, n_val - span, count, dtype=torch.float64).round().long() + self.n_train
        self._val = [self._windows(s) for s in torch.split(starts, cfg.batch_size)]

    @property
    def n_windows(self) -> int:
        """Number of training window start positions (0 … n_train − context − 1)."""
        return self.n_train - self.cfg.context

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(starts), context) int64, of the windows at ``starts``."""
        w = self.data[starts.to(self.device)[:, None] + self._offsets].long()
        return w[:, :-1], w[:, 1:]

    def _chunk(self, peer: int, n_peers: int) -> tuple[int, int]:
        """Contiguous shard: (first start, number of starts) of peer's windows inside its chunk."""
        lo = peer * self.n_train // n_peers
        hi = (peer + 1) * self.n_train // n_peers
        count = hi - lo - self.cfg.context
        if count < 1:
            raise WorkloadError(
                f"contiguous shard of peer {peer} of {n_peers} has {hi - lo} bytes, "
                f"fewer than a window of {self.cfg.context + 1}",
                value=self.cfg.corpus,
            )
        return lo, count

    def shard_starts(self, peer: int, n_peers: int) -> torch.Tensor:
        """Every training window start position of ``peer``'s shard (CPU, int64)."""
        check_peer(peer, n_peers)
        if self.cfg.shard == "iid":
            return iid_permutation(self.seed, self.n_windows)[peer::n_peers]
        lo, count = self._chunk(peer, n_peers)
        return torch.arange(lo, lo + count)

    def build_model(self, seed: int) -> MiniGPT:
        """A :class:`MiniGPT` with GPT-2 initialisation drawn from ``seed``."""
        cfg = self.cfg
        with torch.device("meta"):
            model = MiniGPT(
                d_model=cfg.d_model,
                n_layers=cfg.n_layers,
                n_heads=cfg.n_heads,
                d_ff=self.d_ff,
                context=cfg.context,
            )
        model.to_empty(device="cpu")
        init_gpt(model, generator(seed, "gpt/init"), cfg.n_layers)
        return model.to(device=self.device, dtype=DTYPE)

    def train_batch(self, peer: int, n_peers: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` windows of ``peer``'s shard at round ``k``: (inputs, targets) int64."""
        check_peer(peer, n_peers)
        g = generator(self.seed, "gpt/batch", peer, k)
        if self.cfg.shard == "iid":
            perm = iid_permutation(self.seed, self.n_windows)
            count = (self.n_windows - peer + n_peers - 1) // n_peers
            if count < 1:
                raise WorkloadError(f"IID shard of peer {peer} of {n_peers} is empty", value=self.cfg.corpus)
            starts = perm[peer + n_peers * torch.randint(count, (self.cfg.batch_size,), generator=g)]
        else:
            lo, count = self._chunk(peer, n_peers)
            starts = lo + torch.randint(count, (self.cfg.batch_size,), generator=g)
        return self._windows(starts)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def validation_loss(self, model: nn.Module) -> float:
        return evaluate(model, self._val, lambda batch: self.loss(model, batch))
