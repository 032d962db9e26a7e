"""``demuon simulate --server``: EF21-Muon, the server–worker algorithm, on a config's workload
(layer 6), so that server-based and gossip-based compression can be compared on one workload and
one byte budget.

The config's ``peers`` are the workers; the topology is not used (every worker talks to the
server). The tracker message's codec (``gossip.v``, else ``gossip.codec``) compresses the uplink
(momentum shifts ``R_j``), the parameter message's (``gossip.x``) the downlink (model shifts ``S``);
γ does not apply (EF21 adds whole compressed differences). The step is DeMuon's (routes, shape
factors, decay, schedule: ``algorithm.*``), applied once on the server (``demuon.node.ef21``).

Bytes are counted as whole wire messages (``wire.encode``: header and frames): each worker sends
one message a round and receives the server's broadcast; ``bytes_out`` of a worker's row is its
uplink, ``bytes_in`` its downlink, and the cluster row's ``bytes_per_worker`` the sum of both so far
(what a worker's link carries; the server's own link carries ``n`` downlinks and ``n`` uplinks).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from demuon import results
from demuon.app.peers import peer_setup
from demuon.app.simulate import ProgressHook, SimulationResult
from demuon.app.summary import config_fields
from demuon.config import Config
from demuon.node import ef21, optim
from demuon.node.exchange import wire_size
from demuon.node.newton_schulz import route_for
from demuon.node.peer import codec_seed, ns_dtype_for
from demuon.transport.codecs import Codec, Encoded, make_codec
from demuon.workloads import make_workload

SERVER = -1  # the server's id in codec seeds (workers are 0 … n − 1)


def message_bytes(sender: int, k: int, phase: str, codec: Codec, encoded: Mapping[str, Encoded]) -> int:
    """The size of one message on the wire, header included (the server, id −1, as sender 0)."""
    return wire_size(max(sender, 0), k, phase, codec.kind, encoded)


def _norm(T: Mapping[str, torch.Tensor]) -> float:
    return float(sum(float(t.double().square().sum()) for t in T.values()) ** 0.5)


def run(config: Config, *, out: Path | None = None, progress: ProgressHook | None = None) -> SimulationResult:
    """``config.rounds`` rounds of EF21-Muon with ``config.peers`` workers (see the module
    docstring). The result's ``per_peer`` rows are the workers', ``cluster`` the server's."""
    torch.set_num_threads(config.threads)
    setup = peer_setup(config)
    workload = make_workload(config.workload, seed=config.seed, device=setup.device)
    model = workload.build_model(setup.seed).to(setup.device, setup.dtype)
    params = dict(model.named_parameters())
    alg = config.algorithm
    routes = {n: route_for(n, tuple(p.shape), alg.routing) for n, p in params.items()}
    ns_dtype = ns_dtype_for(alg.routing.ns_dtype, setup.device)
    up, down = make_codec(config.gossip.codec_for("V")), make_codec(config.gossip.codec_for("X"))
    n = config.peers

    X = {k: p.detach().clone() for k, p in params.items()}
    W = {k: x.clone() for k, x in X.items()}
    zeros = {k: torch.zeros_like(x) for k, x in X.items()}
    G = dict(zeros)
    M = [dict(zeros) for _ in range(n)]
    Gj = [dict(zeros) for _ in range(n)]
    res = SimulationResult(config=config, per_peer={j: [] for j in range(n)})
    writers = (
        {j: results.MetricsWriter(results.peer_folder(out, j) / results.METRICS) for j in range(n)}
        if out
        else {}
    )
    cluster = results.MetricsWriter(out / results.CLUSTER) if out else None
    start, carried = time.perf_counter(), 0
    losses = [float("nan")] * n
    try:
        for k in range(config.rounds):
            lr = optim.learning_rate(alg.schedule, alg.lr, k, config.rounds)
            X = ef21.server_step(
                X, G, lr, routes, ns_steps=alg.routing.ns_steps, ns_dtype=ns_dtype,
                weight_decay=alg.weight_decay, adjust_lr=alg.adjust_lr,
            )  # fmt: skip
            seeds = [codec_seed(config.seed, SERVER, k, "X", t) for t in range(len(X))]
            S = ef21.compress(ef21.diff(X, W), down, seeds)
            W = ef21.add(W, S.value)
            down_bytes = message_bytes(SERVER, k, "X", down, S.encoded)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(W[name])
            shifts = []
            for j in range(n):
                model.train()
                model.zero_grad(set_to_none=True)
                loss = workload.loss(model, workload.train_batch(j, n, k))
                torch.autograd.backward(loss)
                losses[j] = float(loss.detach())
                grad = {
                    nm: p.grad.detach().clone() if p.grad is not None else zeros[nm]
                    for nm, p in params.items()
                }
                M[j] = ef21.worker_momentum(M[j], grad, alg.theta)
                seeds = [codec_seed(config.seed, j, k, "V", t) for t in range(len(X))]
                R = ef21.compress(ef21.diff(M[j], Gj[j]), up, seeds)
                Gj[j] = ef21.add(Gj[j], R.value)
                shifts.append(R.value)
                up_bytes = message_bytes(j, k, "V", up, R.encoded)
                row = {"round": k, "train_loss": losses[j], "bytes_out": up_bytes, "bytes_out_V": up_bytes}
                row |= {"bytes_out_X": 0, "bytes_in": down_bytes, "lr": lr}
                res.per_peer[j].append(row)
                if j in writers:
                    writers[j].write(row)
                carried += up_bytes + down_bytes
            G = ef21.server_estimate(G, shifts)
            last = k == config.rounds - 1
            val = None
            if last or (config.eval_every and (k + 1) % config.eval_every == 0):
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(X[name])
                val = workload.validation_loss(model)
            crow: dict[str, Any] = {
                "round": k,
                "train_loss": sum(losses) / n,
                "val_loss": val,
                "model_gap": _norm(ef21.diff(X, W)),  # ‖X − W‖: what the downlink still owes
                "estimate_gap": sum(_norm(ef21.diff(M[j], Gj[j])) for j in range(n)) / n,  # mean ‖M_j − G_j‖
                "bytes_out": sum(r[-1]["bytes_out"] for r in res.per_peer.values()) + n * down_bytes,
                "bytes_per_worker": carried / n,
                "lr": lr,
            }
            res.cluster.append(crow)
            if cluster is not None:
                cluster.write(crow)
            if progress:
                progress(k, crow)
    finally:
        for w in [*writers.values(), *([cluster] if cluster else [])]:
            w.close()
    fp = (float(sum(float(x.double().sum()) for x in X.values())), _norm(X))
    res.summary = results.summary(
        source="simulate",
        **config_fields(config),
        peers=[results.peer_entry(j, config.rounds - 1, losses[j], fp) for j in range(n)],
        validation_loss=res.cluster[-1]["val_loss"] if res.cluster else None,
        averaged_peers=list(range(n)),
        wall_s=time.perf_counter() - start,
        per_peer_rows=res.per_peer,
    )
    res.summary["mode"] = "server (EF21-Muon)"
    res.summary["bytes"]["per_worker_up_and_down"] = carried / n
    if out:
        results.write_summary(out, res.summary)
    return res
