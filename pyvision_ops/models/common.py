"""What the zoo's models share: the small convolutional encoder, and how a model holds its ops."""

import types

from torch import nn

STRIDE = 4  # output resolution is input / STRIDE


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Backbone(nn.Sequential):
    """Six 3x3 conv-BN-ReLU blocks to stride 4, the last two dilated: a receptive field of
    61 pixels (the synthetic objects are at most ~26). Output: ``4 * width`` channels."""

    def __init__(self, width: int = 16):
        super().__init__(_block(3, width), _block(width, 2 * width, 2), _block(2 * width, 2 * width),
                         _block(2 * width, 4 * width, 2), _block(4 * width, 4 * width, dilation=2),
                         _block(4 * width, 4 * width, dilation=4))
        self.out_channels = 4 * width


def bind_ops(ops, names: tuple[str, ...]) -> types.SimpleNamespace:
    """The functions ``names`` of ``ops`` (a module such as pyvision_ops or torchvision.ops,
    or any namespace) in a namespace of their own: a model that holds it can be deep-copied
    and pickled, which a module attribute prevents."""
    missing = [n for n in names if not callable(getattr(ops, n, None))]
    if missing:
        raise TypeError(f"ops must provide {', '.join(names)}; missing {', '.join(missing)}")
    return types.SimpleNamespace(**{n: getattr(ops, n) for n in names})
