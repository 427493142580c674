"""The numbers to choose a cut with: what crosses each possible cut, and the cost on each side.

For every layer that can be a cut, `cut_candidates(model)` gives the float32 bytes
per sample that would cross (all crossing tensors, a skip connection included),
and the parameters and forward FLOPs before and after it. These are the
quantities the SplitEasy paper reasons with (its Table 2 and Figure 4b).

FLOPs count one multiply-add as 2 FLOPs for Dense, convolutions and
normalisation; other layers count one FLOP per output element. They are
forward-pass FLOPs per sample; a training step costs about 3x that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import keras

from splitkeras.errors import SplitKerasError
from splitkeras.graph import ModelGraph, as_functional, plan_segments

__all__ = ["CutCandidate", "cut_candidates", "node_flops"]


def _size(shape: Any) -> int:
    return math.prod(int(d) for d in shape[1:] if d is not None)


def node_flops(node: Any) -> int:
    """Forward FLOPs per sample of one layer call (see the module docstring)."""
    layer = node.operation
    outputs = node.outputs
    out_size = sum(_size(t.shape) for t in outputs)
    inputs = node.input_tensors
    layers = keras.layers
    if isinstance(layer, layers.Dense):
        return 2 * int(layer.kernel.shape[0]) * out_size
    if isinstance(layer, layers.SeparableConv2D) or isinstance(layer, layers.SeparableConv1D):
        kernel = layer.depthwise_kernel.shape
        in_channels = int(inputs[0].shape[-1])
        spatial = out_size // int(outputs[0].shape[-1])
        depthwise = 2 * math.prod(kernel[:-2]) * in_channels * int(kernel[-1]) * spatial
        pointwise = 2 * in_channels * int(kernel[-1]) * out_size
        return depthwise + pointwise
    if isinstance(layer, (layers.DepthwiseConv2D, layers.DepthwiseConv1D)):
        return 2 * math.prod(layer.kernel.shape[:-2]) * out_size
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)) and not isinstance(
        layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    ):
        kernel = layer.kernel.shape  # (*window, in/groups, out)
        return 2 * math.prod(kernel[:-1]) * out_size
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)):
        kernel = layer.kernel.shape  # (*window, out, in)
        return 2 * math.prod(kernel[:-2]) * int(kernel[-1]) * _size(inputs[0].shape)
    if isinstance(layer, (layers.BatchNormalization, layers.LayerNormalization)):
        return 2 * out_size
    if isinstance(layer, keras.Model):
        graph = ModelGraph.of(layer)
        return sum(node_flops(n) for n in graph.layer_nodes)
    return out_size


@dataclass(frozen=True)
class CutCandidate:
    """One layer that can be a cut, and what a single cut there costs."""

    layer: str
    class_name: str
    output_shapes: list[list[int | None]]
    crossing: list[str]  # what the rest receives: head outputs and model inputs it reads
    bytes_per_sample: int  # float32 bytes of all crossing tensors, one sample
    head_parameters: int
    tail_parameters: int
    head_flops: int
    tail_flops: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cut_candidates(model: keras.Model) -> list[CutCandidate]:
    """Every layer of `model` that can be a cut, in topological order.

    Layers that cannot be a cut (inputs, outputs, shared layers) are left out.

    Example:
        >>> rows = cut_candidates(model)                  # doctest: +SKIP
        >>> min(rows, key=lambda r: r.bytes_per_sample).layer   # doctest: +SKIP
    """
    functional = as_functional(model)
    graph = ModelGraph.of(functional)
    flops = {id(n): node_flops(n) for n in graph.layer_nodes}
    params = {id(layer): int(layer.count_params()) for layer in functional.layers}
    total_params = sum(params.values())
    total_flops = sum(flops.values())
    rows: list[CutCandidate] = []
    seen: set[int] = set()
    for node in graph.layer_nodes:
        layer = node.operation
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        try:
            _, plans = plan_segments(functional, [layer.name])
        except SplitKerasError:
            continue
        head = plans[0]
        head_layers = {id(n.operation): n.operation for n in head.nodes}
        head_params = sum(params[k] for k in head_layers)
        head_flops = sum(flops[id(n)] for n in head.nodes)
        # Everything the rest receives crosses: the head's outputs and any model input
        # the rest reads directly (it is sent from where the head runs).
        specs = [graph.spec(t) for t in plans[1].inputs]
        rows.append(
            CutCandidate(
                layer=layer.name,
                class_name=type(layer).__name__,
                output_shapes=[list(t.shape) for t in node.outputs],
                crossing=[s.name for s in specs],
                bytes_per_sample=4 * sum(s.sample_size or 0 for s in specs),
                head_parameters=head_params,
                tail_parameters=total_params - head_params,
                head_flops=head_flops,
                tail_flops=total_flops - head_flops,
            )
        )
    return rows
