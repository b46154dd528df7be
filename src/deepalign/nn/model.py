"""Deep-Align: the siamese matching network (Navon et al., ICML 2024, §3).

One shared DWS encoder embeds every neuron of both networks; per hidden layer, the L2-normalised
embeddings times a learned scale give the score matrix ``Q_m = a_m a'_m^T`` (``Q_m[b, i, j]`` scores
A's neuron i against B's neuron j). Training uses log-domain Sinkhorn on ``Q``; inference a linear
assignment per layer. The result is a :data:`~deepalign.core.permutation.Permutation` that puts B
into A's basis: ``apply(layout.spec, perm, state_b, batch_dims=1)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepalign.core.arch import activation
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec
from deepalign.errors import DeepAlignError
from deepalign.nn.dws import DWSEncoder
from deepalign.nn.pretrained import read_config, read_weights, write_folder
from deepalign.nn.probes import ProbeFeatures
from deepalign.nn.set_layers import POOLINGS, SET_LAYERS
from deepalign.nn.weight_space import ViewSignature, WeightSpaceLayout
from deepalign.solvers.assignment import linear_assignment, log_sinkhorn


@dataclass
class DeepAlignConfig:
    """Hyper-parameters of the Deep-Align network; defaults follow the paper (§3.2) where it has one.

    * ``n_layers`` DWS layers of width ``hidden`` follow the input layer; the last maps to
      ``out_features`` (neuron embedding size). 8 attention heads, SAB set layers, max pooling,
      neighbouring-layer ("diagonal") blocks, BatchNorm, no dropout: as the paper.
    * ``edge_channels``: features per weight entry (``None`` = ``hidden``, DWSNets' choice). Weight
      entries outnumber neurons by the layer width, so this sets most of the cost; with
      ``messages`` (weight-weighted neighbour messages into neuron features) 16 suffices.
      ``edge_channels=None, messages=False`` is the paper's plain DWSNet.
    * ``downsample=K`` compresses the first layer's input axis to K learned probe inputs (the
      paper's MLP setting uses 8 for 784/3072-wide inputs; None keeps every input position).
    * ``activation`` is used inside the encoder; an analytic one (``tanh``, ``gelu``) gives
      Prop. 5's exactness guarantee. ``sinkhorn_iters`` is used by :meth:`DeepAlign.soft`.
    * ``probes=K`` adds probe features (:mod:`deepalign.nn.probes`): each neuron's activations on
      K learned inputs, through an MLP of width ``probe_hidden``, joined to the encoder's
      embedding (MLP and SIREN chains; 0 = off, the paper's model).
    """

    hidden: int = 64
    edge_channels: int | None = 16
    messages: bool = True
    n_layers: int = 4
    out_features: int = 128
    set_layer: str = "sab"
    pooling: str = "max"
    diagonal: bool = True
    downsample: int | None = None
    dropout: float = 0.0
    sinkhorn_iters: int = 20
    n_heads: int = 8
    activation: str = "relu"
    batchnorm: bool = True
    input_norm: bool = True
    init_scale: float = 1.0
    probes: int = 0
    probe_hidden: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> DeepAlignError:
            return DeepAlignError(f"Deep-Align config: {msg}")

        for name in (
            "hidden",
            "n_layers",
            "out_features",
            "sinkhorn_iters",
            "n_heads",
            "probe_hidden",
        ):
            v = getattr(self, name)
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or v < (0 if name == "n_layers" else 1)
            ):
                raise bad(f"{name} must be a positive integer, got {v!r}")
        if self.edge_channels is not None and (
            not isinstance(self.edge_channels, int)
            or isinstance(self.edge_channels, bool)
            or self.edge_channels < 1
        ):
            raise bad(
                f"edge_channels must be None or a positive integer, got {self.edge_channels!r}"
            )
        if not isinstance(self.messages, bool) or not isinstance(self.diagonal, bool):
            raise bad("messages and diagonal must be true or false")
        if self.set_layer not in SET_LAYERS:
            raise bad(f"unknown set_layer {self.set_layer!r} (choose from {', '.join(SET_LAYERS)})")
        if self.pooling not in POOLINGS:
            raise bad(f"unknown pooling {self.pooling!r} (choose from {', '.join(POOLINGS)})")
        try:
            activation(self.activation)
        except DeepAlignError as exc:
            raise bad(str(exc)) from None
        if self.downsample is not None and (
            not isinstance(self.downsample, int)
            or isinstance(self.downsample, bool)
            or self.downsample < 1
        ):
            raise bad(f"downsample must be None or a positive integer, got {self.downsample!r}")
        if not isinstance(self.probes, int) or isinstance(self.probes, bool) or self.probes < 0:
            raise bad(f"probes must be a non-negative integer, got {self.probes!r}")
        if not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise bad(f"init_scale must be a positive number, got {self.init_scale!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise bad(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.set_layer == "sab":
            for name in ("hidden", "out_features"):
                if getattr(self, name) % self.n_heads:
                    raise bad(
                        f"{name}={getattr(self, name)} is not divisible by n_heads={self.n_heads}"
                    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeepAlignConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DeepAlignError(f"Deep-Align config: unknown option(s) {', '.join(unknown)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> DeepAlignConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DeepAlignError(f"Deep-Align config: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DeepAlignError("Deep-Align config: expected a JSON object")
        return cls.from_dict(data)


Scores = dict[str, Tensor]
View = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]


class DeepAlign(nn.Module):
    """Siamese Deep-Align network, batched over pairs; runs on networks of any hidden widths with
    its :class:`~deepalign.nn.weight_space.ViewSignature` (depth, layer kinds, input and output
    sizes, activations).

    Built from the layout of the networks it is trained on (or, loaded, from the signature it
    records). All state dicts are STACKED: every tensor has a leading batch dim ``B`` (one network
    each). Networks of other widths pass their own ``layout`` (:meth:`layout_for`).
    """

    def __init__(
        self,
        layout: WeightSpaceLayout | ViewSignature,
        config: DeepAlignConfig | None = None,
    ) -> None:
        super().__init__()
        self.layout: WeightSpaceLayout | None = (
            layout if isinstance(layout, WeightSpaceLayout) else None
        )
        sig = layout.signature if isinstance(layout, WeightSpaceLayout) else layout
        self.signature: ViewSignature = sig
        self.config = config = config or DeepAlignConfig()
        # the encoder's parameters depend on the depth, the input and output sizes and the largest
        # feature size only (the hidden widths are set axes)
        self.encoder = DWSEncoder(
            [sig.inputs, *[1] * (len(sig.kinds) - 1), sig.outputs],
            max(sig.features),
            hidden=config.hidden,
            edge_channels=config.edge_channels,
            messages=config.messages,
            out_features=config.out_features,
            n_layers=config.n_layers,
            set_layer_kind=config.set_layer,
            pooling=config.pooling,
            diagonal=config.diagonal,
            downsample=config.downsample,
            dropout=config.dropout,
            n_heads=config.n_heads,
            act=config.activation,
            batchnorm=config.batchnorm,
            input_norm=config.input_norm,
            outputs="hidden_biases",
        )
        # Q = s^2 cos(a, a'): s is learned in log space so it can grow quickly from ``init_scale``
        # (s is the inverse temperature of the row softmax and of Sinkhorn).
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.init_scale)))
        self.probes = (
            ProbeFeatures(sig, config.probes, config.out_features, config.probe_hidden)
            if config.probes
            else None
        )
        self.arch: Mapping[str, Any] | None = None  # the networks' config, once known
        self.info: Mapping[str, Any] = {}
        self._layouts: dict[tuple, WeightSpaceLayout] = {}

    @property
    def groups(self) -> list[str]:
        """Spec group of each hidden layer of the layout it was built with."""
        return self._layout(None).hidden_groups

    def _layout(self, layout: WeightSpaceLayout | None) -> WeightSpaceLayout:
        if layout is not None:
            return layout
        if self.layout is None:
            raise DeepAlignError(
                "this aligner was loaded from its signature: pass the networks' layout "
                "(DeepAlign.layout_for(spec, state))"
            )
        return self.layout

    def layout_for(
        self,
        spec: PermutationSpec,
        state: Mapping[str, Tensor],
        batch_dims: int = 1,
        where: str = "aligner",
        activations: tuple[str, ...] | None = None,
    ) -> WeightSpaceLayout:
        """The layout of networks with ``spec`` and tensors like ``state`` (``batch_dims`` leading
        dims), checked against this aligner's signature: one error saying what really differs."""
        shapes = {k: tuple(v.shape[batch_dims:]) for k, v in state.items()}
        key = (id(spec), tuple(sorted(shapes.items())), activations)
        if key in self._layouts:
            return self._layouts[key]
        try:
            layout = WeightSpaceLayout.from_spec(spec, shapes, activations=activations)
        except DeepAlignError as exc:
            raise DeepAlignError(f"{where}: {exc}") from None
        diff = self.signature.differences(layout.signature)
        if diff:
            raise DeepAlignError(
                f"{where}: the aligner was trained for networks of another architecture "
                f"({'; '.join(diff)})"
            )
        self._layouts = {key: layout}  # one entry: the networks of the current call
        return layout

    # -- embeddings -----------------------------------------------------------------------------
    def embed_view(self, weights: tuple[Tensor, ...], biases: tuple[Tensor, ...]) -> list[Tensor]:
        """Per hidden layer, ``(B, d_m, out_features)`` neuron embeddings: unit norm times ``scale``."""
        p = self.log_scale
        weights = tuple(w.to(device=p.device, dtype=p.dtype) for w in weights)
        biases = tuple(b.to(device=p.device, dtype=p.dtype) for b in biases)
        feats = self.encoder(weights, biases)
        if self.probes is not None:  # the two descriptions of each neuron, equally weighted
            seen = self.probes(weights, biases)
            feats = [
                F.normalize(a, dim=-1) + F.normalize(p, dim=-1)
                for a, p in zip(feats, seen, strict=True)
            ]
        scale = self.log_scale.exp()
        return [F.normalize(a, dim=-1) * scale for a in feats]

    def embed(
        self, stacked: Mapping[str, Tensor], layout: WeightSpaceLayout | None = None
    ) -> dict[str, Tensor]:
        """Neuron embeddings of a batch of networks, keyed by hidden group."""
        lay = self._layout(layout)
        return dict(zip(lay.hidden_groups, self.embed_view(*lay.to_view(stacked)), strict=True))

    def scores_from_views(
        self, view_a: View, view_b: View, groups: list[str] | None = None
    ) -> Scores:
        """Score matrices from two padded views with equal batch sizes (one encoder pass for both)."""
        n = view_a[0][0].shape[0]
        if view_b[0][0].shape[0] != n:
            raise DeepAlignError(
                f"A and B hold different numbers of networks ({n} vs {view_b[0][0].shape[0]})"
            )
        both = tuple(
            tuple(torch.cat([x, y]) for x, y in zip(xa, xb, strict=True))
            for xa, xb in zip(view_a, view_b, strict=True)
        )
        feats = self.embed_view(*both)
        return {
            g: torch.einsum("bid,bjd->bij", a[:n], a[n:])
            for g, a in zip(groups or self.groups, feats, strict=True)
        }

    # -- the three uses -------------------------------------------------------------------------
    def forward(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        layout: WeightSpaceLayout | None = None,
    ) -> Scores:
        """``{group: Q (B, n, n)}``, ``Q[b, i, j]`` = score of A's neuron i against B's neuron j."""
        lay = self._layout(layout)
        return self.scores_from_views(lay.to_view(state_a), lay.to_view(state_b), lay.hidden_groups)

    def soft(self, scores: Mapping[str, Tensor] | Tensor, iters: int | None = None):
        """Doubly-stochastic matrices (log-domain Sinkhorn on ``Q``, differentiable).

        A dict of scores gives a dict usable with ``apply_soft(layout.spec, mats, state_b,
        batch_dims=1)``; a single ``(B, n, n)`` tensor gives a tensor.
        """
        n_iter = self.config.sinkhorn_iters if iters is None else iters
        if isinstance(scores, Tensor):
            return log_sinkhorn(scores, n_iter).exp()
        return {g: log_sinkhorn(q, n_iter).exp() for g, q in scores.items()}

    @torch.no_grad()
    def align(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        spec: PermutationSpec | None = None,
    ) -> Permutation:
        """Hard permutations ``(B, n)`` per group (eval mode, Hungarian on ``Q``, maximised).

        ``spec``: the networks' spec when they are not of the layout the aligner was built with
        (any hidden widths). ``apply(spec, perm, state_b, batch_dims=1)`` puts each B into its
        A's basis.
        """
        return self.align_with_similarities(state_a, state_b, spec)[0]

    @torch.no_grad()
    def align_with_similarities(
        self,
        state_a: Mapping[str, Tensor],
        state_b: Mapping[str, Tensor],
        spec: PermutationSpec | None = None,
    ) -> tuple[Permutation, Scores]:
        """:meth:`align`'s permutations and the cosine similarities ``Q / s^2`` (in [-1, 1]) they
        maximise: the aligner's soft answer, e.g. a start for Sinkhorn (``deepalign+sinkhorn``)."""
        layout = None if spec is None else self.layout_for(spec, state_a)
        was_training = self.training
        self.eval()
        try:
            scores = self(state_a, state_b, layout)
        finally:
            self.train(was_training)
        s2 = self.log_scale.detach().mul(2).exp()
        return (
            {g: linear_assignment(q) for g, q in scores.items()},
            {g: (q / s2).clamp(-1, 1) for g, q in scores.items()},
        )

    # -- compatibility and folders --------------------------------------------------------------
    def check_compatible(
        self,
        spec: PermutationSpec,
        arch: Mapping[str, Any] | None = None,
        where: str = "aligner",
        state: Mapping[str, Tensor] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        """Refuse networks this aligner cannot run on: one message saying what really differs
        (depth, layer kinds, input or output size, activation) -- never the hidden widths, which
        may be any. ``state``: one network's tensors (the shapes); ``module``: the networks' class,
        to compare activations when they can be measured."""
        if state is None:
            if module is None:
                raise DeepAlignError(f"{where}: pass the networks' tensors to check an aligner")
            state = module.state_dict()
        acts = None
        if module is not None and self.signature.activations is not None:
            acts = self._activations_of(module)
        self.layout_for(spec, state, batch_dims=0, where=where, activations=acts)

    def _activations_of(self, module: nn.Module) -> tuple[str, ...] | None:
        """The activations of ``module``'s chain, measured once per module (None if unknown)."""
        cached = getattr(self, "_acts_cache", None)
        if cached is not None and cached[0] is module:
            return cached[1]
        try:
            acts = WeightSpaceLayout.from_module(module).activations
        except DeepAlignError:
            acts = None
        self._acts_cache = (module, acts)
        return acts

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu"
    ) -> DeepAlign:
        """Load a trained aligner folder (``config.json`` + ``model.safetensors``), in eval mode."""
        config = read_config(folder)
        model_config = DeepAlignConfig.from_dict(config["model"])
        sig = (
            ViewSignature.from_json(config["signature"], where=f"{folder}/config.json")
            if "signature" in config
            else None
        )
        layout = None
        if config["arch"].get("type") is not None:  # our architecture: its layout is the default
            layout = WeightSpaceLayout.from_config(config["arch"])
            if sig is not None:
                layout = replace(layout, activations=sig.activations)
        elif sig is None:
            raise DeepAlignError(f"{folder}: config.json records neither signature nor arch")
        model = cls(layout if layout is not None else sig, model_config)
        try:
            model.load_state_dict(read_weights(folder))
        except RuntimeError:
            raise DeepAlignError(
                f"{folder}: weights do not match the aligner's config.json"
            ) from None
        model.arch = config["arch"]
        model.info = config
        return model.to(device).eval()

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        arch: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Write this aligner as a folder; ``arch`` is the config of the networks it aligns."""
        info = {"signature": self.signature.to_json(), **dict(info or {})}
        write_folder(folder, self.state_dict(), arch, self.config.to_dict(), info)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
