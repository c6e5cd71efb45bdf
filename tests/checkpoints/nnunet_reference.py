"""nnU-Net's side of the hand-off tests: the network nnU-Net builds from an adaptation plan, and the key
handling of its nnssl loader (the real classes from ``dynamic_network_architectures``)."""

from __future__ import annotations

import pydoc

from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet


def nnunet_network(plan: dict, in_channels: int = 1, num_classes: int = 2) -> ResidualEncoderUNet:
    """The network nnU-Net builds from an adaptation plan (as ``get_network_from_plans`` does)."""
    arch = plan["architecture_plans"]
    kwargs = dict(arch["arch_kwargs"])
    for name in arch["arch_kwargs_requiring_import"]:
        kwargs[name] = pydoc.locate(kwargs[name])
    network_class = pydoc.locate(arch["arch_class_name"])
    return network_class(input_channels=in_channels, num_classes=num_classes, **kwargs).eval()


def load_like_nnssl(network: ResidualEncoderUNet, checkpoint: dict) -> None:
    """nnU-Net's ``PretrainedTrainer.load_pretrained_weights`` key handling (its module pulls nnU-Net's trainer,
    which needs batchgenerators and more): stem and encoder stages cut out by the plan's keys, loaded strictly."""
    plan, weights = checkpoint["nnssl_adaptation_plan"], checkpoint["network_weights"]
    for key in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(key) + 1:]: v for k, v in weights.items() if k.startswith(key + ".")}
        network.get_submodule(key).load_state_dict(part, strict=True)
