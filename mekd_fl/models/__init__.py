"""Networks: CIFAR ResNets for teachers/students and the GAN emulator networks."""

from mekd_fl.models.gan import Critic, Discriminator, Generator, InfoDiscriminator, init_dcgan_weights
from mekd_fl.models.resnet import ARCHITECTURES, count_parameters, parse_depth, resnet

__all__ = [
    "ARCHITECTURES",
    "Critic",
    "Discriminator",
    "Generator",
    "InfoDiscriminator",
    "count_parameters",
    "init_dcgan_weights",
    "parse_depth",
    "resnet",
]
