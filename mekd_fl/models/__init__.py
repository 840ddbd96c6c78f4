"""Networks: CIFAR ResNets for teachers/students and the DCGAN emulator."""

from mekd_fl.models.gan import Discriminator, Generator, init_dcgan_weights
from mekd_fl.models.resnet import ARCHITECTURES, count_parameters, parse_depth, resnet

__all__ = [
    "ARCHITECTURES",
    "Discriminator",
    "Generator",
    "count_parameters",
    "init_dcgan_weights",
    "parse_depth",
    "resnet",
]
