"""Models whose normalization is a parameter: SimpleNet, CIFAR/ImageNet ResNets, VGG-16, R3D.

``create_model(name, num_classes, in_channels, norm="gn", **norm_options)``; names from
:func:`list_models`. Every model resolves its norm once (``groupnorm.get_norm_layer``), uses WS
convs for a ``"+ws"`` norm, and is initialized as in the GN paper (He fan-out convs, γ=1/β=0,
γ=0 on the last norm of each residual block).
"""

from .common import init_weights, resolve_norm
from .registry import MODELS, VIDEO_MODELS, create_model, list_models, register_model
from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from .simplenet import SimpleBlock, SimpleNet
from .vgg import VGG
from .video import VideoResNet

__all__ = [
    "create_model", "list_models", "register_model", "MODELS", "VIDEO_MODELS", "init_weights",
    "resolve_norm", "BasicBlock", "Bottleneck", "ResNet", "CifarResNet", "SimpleBlock",
    "SimpleNet", "VGG", "VideoResNet",
]
