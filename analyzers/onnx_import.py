"""ONNX initializers back into a torch module of the class that was exported.

Used where only the ONNX file of a bundled network is kept: the benchmarks
compare torch with ONNX Runtime on it, and ``train.py`` can continue training
from it. Needs torch and onnx (the training extras), never imported at inference.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn


def load_from_onnx(module: nn.Module, path: Path, example: tuple[torch.Tensor, ...]) -> str:
    """Copy the initializers of the ONNX file at ``path`` into ``module`` (exported from the same class).

    Named initializers load by name. Convolutions are paired with the ONNX Conv /
    ConvTranspose nodes in execution order (the exporter traces in that order);
    a convolution whose output feeds a BatchNorm that the ONNX graph no longer has
    was folded, so the folded weight and bias go into the convolution and the
    BatchNorm becomes the identity (weight 1, bias the folded bias, running mean 0,
    running variance 1 - eps). Such a module reproduces the ONNX outputs in eval
    mode; training it further needs its BatchNorms kept in eval mode (batch
    statistics would undo the identity).

    ``module`` should be in eval mode: ``example`` is run through it once to see
    which convolution feeds which BatchNorm.

    Returns
    -------
    A short description of what was loaded.
    """
    path = Path(path)
    model = onnx.load(str(path))
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    state = module.state_dict()
    named = {k: v for k, v in inits.items() if k in state}
    module.load_state_dict({**state, **named})

    order: list[nn.Module] = []
    folded_bn: dict[int, nn.BatchNorm2d] = {}
    last_out: list = [None]
    hooks = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            def conv_hook(mod, inp, out):
                order.append(mod)
                last_out[0] = (len(order) - 1, out)
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            def bn_hook(mod, inp):
                if last_out[0] is not None and inp[0] is last_out[0][1]:
                    folded_bn[last_out[0][0]] = mod
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.inference_mode():
            module(*example)
    finally:
        for h in hooks:
            h.remove()

    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    nodes = {"Conv": [n for n in model.graph.node if n.op_type == "Conv"], "ConvTranspose": [n for n in model.graph.node if n.op_type == "ConvTranspose"]}
    seen = {"Conv": 0, "ConvTranspose": 0}
    n_folded = 0
    with torch.no_grad():
        for i, conv in enumerate(order):
            kind = "ConvTranspose" if isinstance(conv, nn.ConvTranspose2d) else "Conv"
            if seen[kind] >= len(nodes[kind]):
                raise RuntimeError(f"{path.name}: the torch module runs more {kind} layers than the ONNX graph has")
            node = nodes[kind][seen[kind]]
            seen[kind] += 1
            w = inits[node.input[1]]
            b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            conv.weight.copy_(w.reshape(conv.weight.shape))
            bn = folded_bn.get(i)
            if bn is not None and "BatchNormalization" not in consumers.get(node.output[0], []):
                n_folded += 1
                if conv.bias is not None:
                    conv.bias.zero_()
                bn.weight.fill_(1.0)
                bn.bias.copy_(b if b is not None else torch.zeros_like(bn.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
            elif b is not None:
                conv.bias.copy_(b)
    if seen != {k: len(v) for k, v in nodes.items()}:
        raise RuntimeError(f"{path.name}: ONNX has {[(k, len(v)) for k, v in nodes.items()]} convolutions, the torch module ran {seen}")
    return f"from ONNX ({len(named)} named tensors, {len(order)} conv calls, {n_folded} BatchNorm folds undone)"
