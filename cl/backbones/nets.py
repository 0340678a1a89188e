"""Built-in backbones: MLP, small CNN, tiny ViT presets, CIFAR ResNet-18, and any timm model."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl.backbones.base import BackboneBuilder
from cl.config import BackboneConfig, opt
from cl.errors import UserError
from cl.registry import register_backbone


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
            d = hidden
        self.net = nn.Sequential(*layers)
        self.num_features = d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_backbone("mlp")
class MLPBackbone(BackboneBuilder):
    description = "flatten + ReLU MLP (tests, overhead-bound benchmark)"

    @dataclass
    class Config(BackboneConfig):
        name: str = opt("mlp", "registered backbone name")
        hidden: int = opt(128, "hidden width", ge=1)
        depth: int = opt(2, "hidden layers", ge=1)

    def build(self, cfg: Config, input_shape: tuple[int, int, int]) -> nn.Module:
        c, h, w = input_shape
        return MLP(c * h * w, cfg.hidden, cfg.depth)


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool x3 then global average pooling."""

    def __init__(self, channels: int, width: int, batchnorm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for mult in (1, 2, 4):
            layers += [nn.Conv2d(c, width * mult, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(width * mult)] if batchnorm else []
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = width * mult
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = c

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_backbone("cnn")
class CNNBackbone(BackboneBuilder):
    description = "3-block conv net with BatchNorm (compute-bound benchmark, quick tests)"

    @dataclass
    class Config(BackboneConfig):
        name: str = opt("cnn", "registered backbone name")
        width: int = opt(32, "channels of the first block (x2, x4 after)", ge=1)
        batchnorm: bool = opt(True, "use BatchNorm")

    def build(self, cfg: Config, input_shape: tuple[int, int, int]) -> nn.Module:
        return SmallCNN(input_shape[0], cfg.width, cfg.batchnorm)


# ------------------------------------------------------------------------------------------------ ResNet-18 (CIFAR)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) and base width ``nf`` (64 = standard)."""

    def __init__(self, channels: int = 3, nf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers, cin = [], nf
        for i, mult in enumerate((1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, nf * mult, stride), BasicBlock(nf * mult, nf * mult, 1)))
            cin = nf * mult
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = cin

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)  # (B, 8*nf)


@register_backbone("resnet18_cifar")
class ResNet18CifarBackbone(BackboneBuilder):
    description = "ResNet-18, CIFAR stem, width nf (PRD, k-FPF); nf=64 is the papers' size"

    @dataclass
    class Config(BackboneConfig):
        name: str = opt("resnet18_cifar", "registered backbone name")
        nf: int = opt(64, "base width (64 = standard ResNet-18; 8-20 for CPU tests)", ge=1)

    def build(self, cfg: Config, input_shape: tuple[int, int, int]) -> nn.Module:
        return ResNet18Cifar(input_shape[0], cfg.nf)


# ------------------------------------------------------------------------------------------------ ViTs through timm


def _timm_vit(img_size: int, channels: int, patch: int, width: int, depth: int, heads: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch, in_chans=channels, num_classes=0, embed_dim=width,
                             depth=depth, num_heads=heads, mlp_ratio=4.0)


@register_backbone("vit")
class TinyViT(BackboneBuilder):
    """A timm ``VisionTransformer`` of any small size, built locally (random init or ``backbone.checkpoint``).

    Measured on 2 CPU cores (training, batch 64): 32 px, patch 4, width 64, depth 4 about 1,100 images/s;
    width 192 about 280 images/s.
    """

    description = "timm VisionTransformer of chosen size (img_size/patch/width/depth/heads), local init"

    @dataclass
    class Config(BackboneConfig):
        name: str = opt("vit", "registered backbone name")
        patch: int = opt(4, "patch size", ge=1)
        width: int = opt(64, "embedding width", ge=8)
        depth: int = opt(4, "number of blocks", ge=1)
        heads: int = opt(2, "attention heads", ge=1)

    def build(self, cfg: Config, input_shape: tuple[int, int, int]) -> nn.Module:
        c, h, _ = input_shape
        return _timm_vit(h, c, cfg.patch, cfg.width, cfg.depth, cfg.heads)


def _preset(preset: str, w: int, d: int, h: int, speed: str) -> None:
    # class bodies do not see enclosing-function names that they also assign, hence the short parameter names
    @register_backbone(preset)
    class Preset(TinyViT):
        description = f"ViT patch 4, width {w}, depth {d}, {h} heads; {speed} on 2 CPU cores at 32 px"

        @dataclass
        class Config(TinyViT.Config):
            name: str = opt(preset, "registered backbone name")
            width: int = opt(w, "embedding width", ge=8)
            depth: int = opt(d, "number of blocks", ge=1)
            heads: int = opt(h, "attention heads", ge=1)

    Preset.__name__ = f"ViTPreset_{preset}"


_preset("vit_p4_w64_d4", 64, 4, 2, "~1,100 img/s training")
_preset("vit_p4_w192_d4", 192, 4, 3, "~280 img/s training")


@register_backbone("timm")
class TimmBackbone(BackboneBuilder):
    """Any timm model by name, with the real ``pretrained=True`` download for users with internet access."""

    description = "any timm model (backbone.model=..., backbone.pretrained=true downloads weights)"

    @dataclass
    class Config(BackboneConfig):
        name: str = opt("timm", "registered backbone name")
        model: str = opt("vit_base_patch16_224.augreg_in21k", "timm model name (with pretrained tag)")
        img_size: int | None = opt(None, "override the model's input size")

    def build(self, cfg: Config, input_shape: tuple[int, int, int]) -> nn.Module:
        import timm

        kwargs = {"num_classes": 0, "in_chans": input_shape[0]}
        if cfg.img_size:
            kwargs["img_size"] = cfg.img_size
        if not cfg.pretrained:
            return timm.create_model(cfg.model, pretrained=False, **kwargs)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        try:
            return timm.create_model(cfg.model, pretrained=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
            why = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            raise UserError(
                f"cannot load pretrained weights for '{cfg.model}' ({why}); with no internet use "
                "backbone.pretrained=false, or backbone.checkpoint=PATH with a local state dict "
                "(`cl pretrain` makes one)"
            ) from None
