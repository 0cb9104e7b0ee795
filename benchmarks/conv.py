"""Conv2D forward+backward and the CNN's full step against torch on the CPU, one thread each."""
import os

# One thread for both sides, set before NumPy and torch load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import psframe as ps  # noqa: E402

# (in, out, kernel, stride, padding, image size): the CNN's two convolutions, then a 3x3 and a
# strided one.
CONVS = [(1, 16, 5, 1, 2, 28), (16, 32, 5, 1, 2, 14), (8, 16, 3, 1, 1, 14), (8, 16, 3, 2, 1, 28)]


def best_ms(step, repeats, rounds=7):
    """The fastest of ``rounds`` timings of ``repeats`` calls, per call: least disturbed by
    whatever else shares the cores."""
    step()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        times.append((time.perf_counter() - t0) / repeats)
    return min(times) * 1e3


def conv_pair(c_in, c_out, k, stride, pad, size, batch, rng):
    layer = ps.layers.Conv2D(c_in, c_out, k, stride=stride, padding=pad)
    params = {n: v.astype(np.float32) for n, v in layer.init_params(rng).items()}
    x = rng.normal(size=(batch, c_in, size, size)).astype(np.float32)
    y, _ = layer.forward(params, x)
    dy = rng.normal(size=y.shape).astype(np.float32)

    def ours():
        out, cache = layer.forward(params, x)
        layer.backward(params, cache, dy)

    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad)
    xt = torch.tensor(x, requires_grad=True)
    dyt = torch.tensor(dy)

    def theirs():
        conv.zero_grad(set_to_none=True)
        xt.grad = None
        conv(xt).backward(dyt)

    return ours, theirs


def torch_cnn(model):
    """The same network in torch, from the psframe model's layers."""
    mods = []
    for layer in model.layers:
        if isinstance(layer, ps.layers.Reshape):
            mods.append(torch.nn.Unflatten(1, layer.shape))
        elif isinstance(layer, ps.layers.Conv2D):
            mods.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                        layer.stride, layer.padding))
        elif isinstance(layer, ps.layers.MaxPool2D):
            mods.append(torch.nn.MaxPool2d(layer.kernel_size, layer.stride))
        elif isinstance(layer, ps.layers.ReLU):
            mods.append(torch.nn.ReLU())
        elif isinstance(layer, ps.layers.Flatten):
            mods.append(torch.nn.Flatten())
        elif isinstance(layer, ps.layers.Dense):
            mods.append(torch.nn.Linear(layer.n_in, layer.n_out))
        elif isinstance(layer, ps.layers.Dropout):
            mods.append(torch.nn.Dropout(layer.p))
        else:
            raise TypeError(f"no torch counterpart for {layer!r}")
    return torch.nn.Sequential(*mods)


def cnn_pair(batch, rng):
    model = ps.models.CNN()
    params = {n: v.astype(np.float32) for n, v in model.init_params(rng).items()}
    X = rng.random((batch, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch)

    def ours():
        model.loss_and_grad(params, X, y)

    net = torch_cnn(model)
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def theirs():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()

    return model, ours, theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1):
        for spec in CONVS:
            ours, theirs = conv_pair(*spec, args.batch, rng)
            c_in, c_out, k, stride, pad, size = spec
            name = f"Conv2D({c_in}, {c_out}, {k}, stride={stride}, padding={pad}) on {size}x{size}"
            rows.append((name, best_ms(ours, args.repeats), best_ms(theirs, args.repeats)))
        model, ours, theirs = cnn_pair(args.batch, rng)
        rows.append((f"{model!r} loss_and_grad", best_ms(ours, args.repeats),
                     best_ms(theirs, args.repeats)))
    print(f"float32, batch {args.batch}, 1 thread each; numpy {np.__version__}, "
          f"torch {torch.__version__}; forward+backward, best of 7 rounds")
    print(f"{'':58s} {'psframe ms':>10s} {'torch ms':>9s} {'speed vs torch':>15s}")
    for name, ours_ms, theirs_ms in rows:
        print(f"{name:58s} {ours_ms:10.3f} {theirs_ms:9.3f} {theirs_ms / ours_ms:14.2f}x")


if __name__ == "__main__":
    main()
