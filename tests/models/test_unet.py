"""ResEncUNet: the nnU-Net ResEnc-L layout, shapes, encoder-key transfer, validation, gradients, overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maesil.models.parameters import count_parameters
from maesil.models.unet import (
    UNET_PRESETS,
    ResEncUNet,
    ResidualBlock,
    ResidualStage,
    resenc_unet,
)

#: nnU-Net ResEnc-L: widths, residual blocks and first-block strides of its 6 encoder stages.
RESENC_L_FEATURES = (32, 64, 128, 256, 320, 320)
RESENC_L_BLOCKS = (1, 3, 4, 6, 6, 6)
RESENC_L_STRIDES = (1, 2, 2, 2, 2, 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These inputs are tiny: one intra-op thread is as fast, and immune to OpenMP spin-waiting when another process
    holds a core (2 threads then ran the overfitting test 40× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resenc_l() -> ResEncUNet:
    torch.manual_seed(0)
    return resenc_unet("resenc_l")


def test_resenc_l_module_has_the_nnunet_layout(resenc_l):
    stages = resenc_l.encoder.stages
    assert len(stages) == 6
    assert resenc_l.encoder.stem.conv.in_channels == 1
    assert resenc_l.encoder.stem.conv.out_channels == RESENC_L_FEATURES[0]
    in_channels = RESENC_L_FEATURES[0]
    for stage, width, blocks, stride in zip(stages, RESENC_L_FEATURES, RESENC_L_BLOCKS, RESENC_L_STRIDES):
        assert isinstance(stage, ResidualStage)
        residual = [m for m in stage.modules() if isinstance(m, ResidualBlock)]
        assert len(residual) == blocks
        for b, block in enumerate(residual):
            assert block.conv1.in_channels == (in_channels if b == 0 else width)
            assert block.conv1.out_channels == block.conv2.out_channels == width
            assert block.conv1.stride == ((stride,) * 3 if b == 0 else (1, 1, 1))
            assert block.conv1.kernel_size == block.conv2.kernel_size == (3, 3, 3)
            assert isinstance(block.norm1, nn.InstanceNorm3d) and block.norm1.affine and block.norm1.eps == 1e-5
        in_channels = width
    # Decoder: one transposed conv + one conv block per level, coarsest first.
    assert [up.out_channels for up in resenc_l.decoder.upsamples] == [320, 256, 128, 64, 32]
    assert [up.stride for up in resenc_l.decoder.upsamples] == [(2, 2, 2)] * 5
    assert [len(level) for level in resenc_l.decoder.stages] == [1] * 5
    assert [level[0].conv.in_channels for level in resenc_l.decoder.stages] == [640, 512, 256, 128, 64]
    assert resenc_l.feature_channels == [320, 256, 128, 64, 32]
    assert resenc_l.total_stride == 32
    assert resenc_l.head.in_channels == 32 and resenc_l.head.out_channels == 1


def test_resenc_l_parameter_count(resenc_l):
    total, encoder = count_parameters(resenc_l), count_parameters(resenc_l.encoder)
    print(f"resenc_l: {total:,} parameters ({encoder:,} in the encoder)")
    assert 95e6 < total < 110e6, total  # ≈ 102.3 M
    assert 0.85 < encoder / total < 0.92, encoder / total


def test_resenc_l_forward_small_input(resenc_l):
    resenc_l.eval()
    with torch.no_grad():
        out = resenc_l(torch.randn(1, 1, 64, 32, 32))
    assert out.shape == (1, 1, 64, 32, 32)
    assert torch.isfinite(out).all()


def test_preset_parameter_counts():
    cpu, tiny = resenc_unet("cpu"), resenc_unet("tiny")
    print(f"cpu: {count_parameters(cpu):,}  tiny: {count_parameters(tiny):,}")
    assert 1e6 < count_parameters(cpu) < 3e6
    assert count_parameters(tiny) < 50_000
    assert UNET_PRESETS["cpu"]["features"] == (16, 32, 64, 128)
    with pytest.raises(ValueError, match="resenc_l"):
        resenc_unet("resenc_xl")


@pytest.mark.parametrize("size", [(16, 16, 16), (32, 32, 16), (8, 24, 16)])
def test_tiny_shapes(size):
    torch.manual_seed(0)
    net = resenc_unet("tiny", out_channels=3, in_channels=2)
    x = torch.randn(2, 2, *size)
    assert net(x).shape == (2, 3, *size)
    skips = net.encode(x)
    assert len(skips) == net.num_stages == 3
    assert [s.shape[1] for s in skips] == [4, 8, 16]
    assert [s.shape[2:] for s in skips] == [torch.Size(d // f for d in size) for f in (1, 2, 4)]
    feats = net.decode(skips)
    assert len(feats) == net.num_stages - 1
    assert [f.shape[1] for f in feats] == net.feature_channels == [8, 4]
    assert [f.shape[2:] for f in feats] == [torch.Size(d // f for d in size) for f in (2, 1)]  # coarsest first
    assert all(torch.equal(a, b) for a, b in zip(net.forward_features(x), feats))


def test_cpu_shapes():
    torch.manual_seed(0)
    net = resenc_unet("cpu", out_channels=3)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (1, 3, 32, 32, 32)
        feats = net.forward_features(x)
    assert net.feature_channels == [64, 32, 16]
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 8, 8), (32, 16, 16, 16), (16, 32, 32, 32)]


def test_feature_extractor_without_head():
    net = resenc_unet("tiny", out_channels=None)
    assert net.head is None
    assert not any(k.startswith("head.") for k in net.state_dict())
    assert len(net.forward_features(torch.randn(1, 1, 8, 8, 8))) == 2
    with pytest.raises(RuntimeError, match="out_channels=None"):
        net(torch.randn(1, 1, 8, 8, 8))


def test_parameter_prefixes_and_encoder_transfer():
    torch.manual_seed(0)
    source = resenc_unet("tiny", out_channels=1)
    names = [n for n, _ in source.named_parameters()]
    assert all(n.split(".")[0] in {"encoder", "decoder", "head"} for n in names)
    assert all(n.startswith(ResEncUNet.encoder_prefix) for n, _ in source.encoder.named_parameters(prefix="encoder"))
    assert any(n.startswith("encoder.stem.") for n in names)
    enc_params = {p for p in source.encoder.parameters()}
    assert {p for n, p in source.named_parameters() if n.startswith("encoder.")} == enc_params

    encoder_state = {k: v for k, v in source.state_dict().items() if k.startswith(ResEncUNet.encoder_prefix)}
    target = resenc_unet("tiny", out_channels=5)
    result = target.load_state_dict(encoder_state, strict=False)
    assert result.unexpected_keys == []
    assert not [k for k in result.missing_keys if k.startswith("encoder.")]
    assert all(k.startswith(("decoder.", "head.")) for k in result.missing_keys)
    for k, v in encoder_state.items():
        assert torch.equal(target.state_dict()[k], v)
    x = torch.randn(1, 1, 8, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(source.encode(x), target.encode(x)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=(4, 8), blocks_per_stage=(1, 1, 1), strides=(1, 2)), "same length"),
        (dict(features=(4,), blocks_per_stage=(1,), strides=(1,)), "at least 2 stages"),
        (dict(features=(4, 0, 8)), r"features .*\[4, 0, 8\]"),
        (dict(blocks_per_stage=(1, -1, 1)), r"blocks_per_stage .*-1"),
        (dict(strides=(1, 2, 0)), r"strides .*0"),
        (dict(kernel_size=4), "odd.*4"),
        (dict(decoder_blocks=0), "decoder_blocks"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=0), "out_channels"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    config = {**UNET_PRESETS["tiny"], **kwargs}
    with pytest.raises(ValueError, match=match):
        ResEncUNet(**config)


def test_bad_inputs_raise():
    net = resenc_unet("tiny")
    assert net.total_stride == 4
    with pytest.raises(ValueError, match=r"\(16, 16, 10\).*multiple of 4"):
        net(torch.randn(1, 1, 16, 16, 10))
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 16, 10\)"):
        net.encode(torch.randn(1, 1, 16, 16, 10))
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="single voxel"):
        net(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        net(torch.randn(1, 16, 16, 16))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = resenc_unet("tiny", out_channels=2)
    net(torch.randn(2, 1, 16, 16, 8)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_zero_init_residual_starts_blocks_as_shortcuts():
    net = resenc_unet("tiny", zero_init_residual=True)
    blocks = [m for m in net.modules() if isinstance(m, ResidualBlock)]
    assert blocks and all(torch.all(b.norm2.weight == 0) for b in blocks)
    assert all(torch.all(b.norm1.weight == 1) for b in blocks)


def test_overfits_a_single_pair():
    torch.manual_seed(0)
    net = resenc_unet("tiny", out_channels=1)
    x, y = torch.randn(1, 1, 8, 8, 8), torch.randn(1, 1, 8, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])  # ≈ 12× with seed 0
