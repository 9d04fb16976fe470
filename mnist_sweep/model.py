"""The student: a feedforward network (multi-layer perceptron) of any width and depth.

It takes plain arguments, never the whole config, so it can be built and tested on its own:

    MLP(hidden=256, depth=2)  ->  Flatten -> Linear(784, 256) -> ReLU -> Linear(256, 256) -> ReLU -> Linear(256, 10)

``build(members=N, ...)`` gives N such nets trained side by side, their predictions averaged (``Ensemble``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mnist_sweep.data import deskew

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


class MLP(nn.Module):
    """``depth`` hidden layers of ``hidden`` units, each Linear -> [norm] -> activation -> [dropout].

    ``input_dropout`` drops pixels before the first layer (Hinton et al. 2012 used 0.2 with 0.5 on the
    hidden layers): the wide nets of the best recipe overfit without it.

    ``depth=0`` is plain logistic regression (one Linear layer from pixels to classes).
    """

    def __init__(
        self,
        in_features: int = 28 * 28,
        hidden: int = 256,
        depth: int = 2,
        num_classes: int = 10,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
        input_dropout: float = 0.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: choose one of {', '.join(NORMS)}")
        self.args = {  # what rebuilds it (saved_model writes them beside the weights)
            "in_features": in_features,
            "hidden": hidden,
            "depth": depth,
            "num_classes": num_classes,
            "activation": activation,
            "dropout": dropout,
            "norm": norm,
            "input_dropout": input_dropout,
        }
        layers: list[nn.Module] = [nn.Flatten()]  # 1x28x28 image -> 784 pixels in a row
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            if NORMS[norm] is not None:
                layers.append(NORMS[norm](hidden))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))  # one score (logit) per class
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Ensemble(nn.Module):
    """``members`` MLPs of the same shape, each from its own random start, whose votes are averaged.

    Still one feedforward network - the members side by side are a single MLP whose layers are
    block-diagonal - but its members learn on their own: in training it returns every member's scores,
    ``[members, N, classes]``, and ``training.fit`` gives each member its own loss. In evaluation it returns
    the log of the members' mean class probabilities, ``[N, classes]``, so argmax and cross-entropy work
    on it as on one net's scores. Members err on different digits, so the average errs less often.
    """

    def __init__(self, members: int, **mlp_args):
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs 2 or more members, not {members}; use MLP for one")
        self.members = nn.ModuleList(MLP(**mlp_args) for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.stack([m(x) for m in self.members])
        if self.training:
            return scores
        return scores.float().log_softmax(-1).logsumexp(0) - math.log(len(self.members))


def build(members: int = 1, **mlp_args) -> nn.Module:
    """One MLP, or an Ensemble of ``members`` of them (the arguments saved beside the weights rebuild either)."""
    return MLP(**mlp_args) if members == 1 else Ensemble(members, **mlp_args)


class Classifier(nn.Module):
    """What gets exported: raw images in, class scores out.

    Takes images as users have them - uint8 pixels 0..255 (any integer type: JSON numbers arrive as int64) or
    float 0..1 (float16/32/64), shaped ``[N,28,28]``, ``[N,1,28,28]`` or ``[N,784]`` - and applies the training
    preprocessing itself (``deskew`` when the net was trained on deskewed digits, then ``Normalize``), so users
    of the saved model need not know the dataset's mean and std. Anything else raises a one-line ValueError
    that names the shape, dtype and range expected (never the array itself).
    """

    side = 28  # MNIST and Fashion-MNIST images are 28x28

    def __init__(self, net: nn.Module, mean: float, std: float, deskew: bool = False):
        super().__init__()
        self.net = net
        self.deskew = deskew
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x) -> torch.Tensor:
        x = self.pixels(x)
        if self.deskew:
            x = deskew(x.view(-1, self.side, self.side)).view(x.shape)
        return self.net((x - self.mean) / self.std)

    def pixels(self, x) -> torch.Tensor:
        """Any accepted input as float32 ``[N, 784]`` in 0..1; a ValueError for anything else."""
        side = self.side
        x = torch.as_tensor(x)
        shape = tuple(x.shape)
        expected = f"[N,{side},{side}], [N,1,{side},{side}] or [N,{side * side}]"
        kind = "uint8 0..255 or float 0..1"
        got = f"[{','.join(map(str, shape))}] {str(x.dtype).removeprefix('torch.')}"
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise ValueError(f"images must be {kind}, shaped {expected}; got {got}")
        if shape[1:] not in ((side, side), (1, side, side), (side * side,)):
            hint = " (one image? add the batch axis: x[None])" if shape in ((side, side), (1, side, side)) else ""
            raise ValueError(f"images must be shaped {expected} ({kind}); got {got}{hint}")
        integer = not x.dtype.is_floating_point
        x = x.reshape(shape[0], side * side)
        if not torch.compiler.is_exporting() and x.numel():  # torch.export (pt2) cannot trace value checks
            low, high = x.min().item(), x.max().item()
            if integer and (low < 0 or high > 255):
                raise ValueError(f"integer pixels must be 0..255; got values {low}..{high} in {got}")
            if not integer and not (0 <= low and high <= 1):  # also catches NaN
                advice = ": divide uint8 pixels by 255" if high > 1 else ""
                raise ValueError(f"float pixels must be 0..1; got values {low:.4g}..{high:.4g} in {got}{advice}")
        return x.float() / 255 if integer else x.float()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module) -> int:
    """Multiply-adds x2 of the Linear layers, forward only (training is about 3x this)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def load_checkpoint(path) -> Classifier:
    """Rebuild the exported classifier from ``checkpoint/model.pt`` (its config is saved beside it)."""
    return classifier_from(torch.load(path, map_location="cpu", weights_only=True))


def classifier_from(ckpt: dict) -> Classifier:
    """The classifier of a checkpoint already read with ``torch.load``."""
    net = build(**ckpt["model_args"])
    net.load_state_dict(ckpt["state_dict"])
    return Classifier(net, ckpt["mean"], ckpt["std"], ckpt.get("deskew", False)).eval()
