"""A psframe Sequential rebuilt in torch (float64) with the same weights: the tests' reference."""
import torch

import psframe as ps

_SIMPLE = {ps.layers.ReLU: torch.nn.ReLU, ps.layers.Flatten: torch.nn.Flatten}


def torch_twin(model, params):
    """The same network in torch with psframe's weights (Dense W transposed into Linear)."""
    mods = []
    for layer in model.layers:
        if isinstance(layer, ps.layers.Reshape):
            mods.append(torch.nn.Unflatten(1, layer.shape))
        elif isinstance(layer, ps.layers.Conv2D):
            mods.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels,
                                        layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, ps.layers.MaxPool2D):
            mods.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride))
        elif isinstance(layer, ps.layers.Dense):
            mods.append(torch.nn.Linear(layer.n_in, layer.n_out))
        elif type(layer) in _SIMPLE:
            mods.append(_SIMPLE[type(layer)]())
        else:
            raise TypeError(f"no torch twin for {layer!r}")
    net = torch.nn.Sequential(*mods).double()
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if layer.param_shapes():
                W = params[f"{i}.W"]
                dense = isinstance(layer, ps.layers.Dense)
                net[i].weight.copy_(torch.tensor(W.T if dense else W))
                net[i].bias.copy_(torch.tensor(params[f"{i}.b"]))
    return net
