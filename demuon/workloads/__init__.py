"""Workloads: what the peers train (layer 2, pure torch).

``make_workload(cfg, seed=..., device=...)`` turns a ``[workload]`` config section into an object
satisfying the :class:`Workload` protocol: ``quadratic`` (heterogeneous least squares with exact
references), ``logistic`` (multinomial logistic regression), ``gpt`` (byte-level GPT on a text
corpus, by default the Python standard library sources) or ``custom`` (a ``module:function``
factory).
"""

from demuon.workloads.base import Workload, derive_seed, generator
from demuon.workloads.corpus import load_corpus
from demuon.workloads.factory import make_workload
from demuon.workloads.gpt import ByteLanguageModel, MiniGPT
from demuon.workloads.logistic import LogisticRegression
from demuon.workloads.quadratic import LeastSquares

__all__ = [
    "ByteLanguageModel",
    "LeastSquares",
    "LogisticRegression",
    "MiniGPT",
    "Workload",
    "derive_seed",
    "generator",
    "load_corpus",
    "make_workload",
]
