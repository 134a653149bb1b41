"""NHWC (channels-last) training: the same network function, the same dropout masks, no layout flips."""

import copy

import pytest
import torch

import dnnlib
from training.methods import loss as loss_lib
from training import networks
from training.networks import layers


def _net(dropout):
    torch.manual_seed(0)
    net = networks.ECMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)   # no zero-initialised layer
    return net


def assert_same_function(net, other, out, out_other, rtol):
    """Outputs within rtol, and the gradients of sum(out^2) within 10 rtol (relative to each one's largest)."""
    torch.testing.assert_close(out_other, out, rtol=rtol, atol=rtol)
    out.square().sum().backward()
    out_other.square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=10 * rtol, atol=10 * rtol * float(p.grad.abs().max()),
                                   msg=name)


def test_channels_last_computes_the_same_function_and_gradients():
    net = _net(dropout=0)
    nhwc = layers.set_memory_format(copy.deepcopy(net), 'channels_last')
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.dim() == 4)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.2, 1.0, 5.0])
    out, out_cl = net(x, sigma), nhwc(x, sigma)
    assert out_cl.is_contiguous()   # callers get NCHW back
    assert_same_function(net, nhwc, out, out_cl, rtol=1e-5)


def test_attention_keeps_the_layout_of_its_input():
    qkv = torch.randn(2, 3 * 8, 4, 4)
    flat = layers.attention(qkv, num_heads=2)
    nhwc = layers.attention(qkv.contiguous(memory_format=torch.channels_last), num_heads=2)
    assert flat.is_contiguous() and layers.is_channels_last(nhwc)
    torch.testing.assert_close(nhwc, flat, rtol=1e-6, atol=1e-6)


def test_dropout_masks_do_not_depend_on_the_layout():
    x = torch.randn(2, 4, 3, 3)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, p=0.5, training=True)     # torch's own (CPU) dropout
    torch.manual_seed(5)
    assert torch.equal(layers.dropout(x, 0.5, True), expected)
    torch.manual_seed(5)
    got = layers.dropout(x.contiguous(memory_format=torch.channels_last), 0.5, True)
    assert torch.equal(got, expected)


def test_shared_dropout_in_channels_last():
    net = layers.set_memory_format(_net(dropout=0.5), 'channels_last').train()
    loss_fn = loss_lib.ECTLoss(mapping=dict(class_name='training.methods.loss.ConstantMapping', q=1e9))  # r ~ t
    x0 = torch.randn(3, 3, 8, 8)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.3, 1.0, 4.0]).reshape(-1, 1, 1, 1)
    f_t, f_r = loss_fn.prediction_and_target(net, x0, t, t.clone(), eps)
    assert torch.equal(f_t.detach(), f_r)


def test_unknown_memory_format_is_one_clear_error():
    with pytest.raises(dnnlib.UserError, match='memory_format: "nhwc"'):
        layers.set_memory_format(_net(0), 'nhwc')
