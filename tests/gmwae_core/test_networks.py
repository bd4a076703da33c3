import pytest
import torch
from torch import nn

from gmwae_core.networks import Decoder, ToOneChannel, _ToOneChannelFn


@pytest.mark.parametrize("channels", [3, 8])
def test_one_channel_layer_equals_the_transposed_convolution_forward_and_backward(channels):
    torch.manual_seed(0)
    fast = ToOneChannel(channels, 5, padding=2).double()
    plain = nn.ConvTranspose2d(channels, 1, 5, stride=1, padding=2).double()
    plain.load_state_dict(fast.state_dict())  # same parameter names: checkpoints carry over
    x = torch.randn(4, channels, 9, 9, dtype=torch.double).contiguous(
        memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), plain(xb)
    assert ya.shape == yb.shape == (4, 1, 9, 9)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad)


def test_one_channel_layer_passes_gradcheck():
    torch.manual_seed(1)
    layer = ToOneChannel(2, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.double, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _ToOneChannelFn.apply(x, w, b, 1), (x, w, b))


def test_one_channel_layer_rejects_a_padding_it_cannot_express():
    with pytest.raises(ValueError, match="padding=3, kernel_size=5"):
        ToOneChannel(8, 5, padding=3)


def test_decoder_state_dict_keys_are_those_of_a_plain_transposed_convolution():
    dec = Decoder(latent_dim=4, width=8)
    assert isinstance(dec.deconv[-1], nn.ConvTranspose2d)
    assert "deconv.6.weight" in dec.state_dict() and "deconv.6.bias" in dec.state_dict()
    assert dec(torch.randn(3, 4)).shape == (3, 1, 28, 28)


def test_compiled_decoder_matches_the_eager_one_forward_and_backward():
    # `--set compile=true` compiles the decoder, the one-channel layer's Function included.
    torch.manual_seed(0)
    eager = Decoder(latent_dim=3, width=8)
    compiled = Decoder(latent_dim=3, width=8)
    compiled.load_state_dict(eager.state_dict())
    run = torch.compile(compiled)
    z = torch.randn(6, 3)
    ya, yb = eager(z), run(z)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
        # float32 sums in another order: compare against each gradient's own scale
        assert (pa.grad - pb.grad).abs().max() <= 1e-4 * pa.grad.abs().max(), name


def test_the_channels_last_decoder_equals_a_contiguous_one_forward_and_backward():
    """The decoder runs its deconvolutions in channels_last (the layout oneDNN and cuDNN
    prefer); the same layers on contiguous tensors, with the last one as the plain
    transposed convolution, give the same images and gradients."""
    import copy

    torch.manual_seed(2)
    decoder = Decoder(latent_dim=4, width=16).double()
    reference = copy.deepcopy(decoder).to(memory_format=torch.contiguous_format)
    last = reference.deconv[-1]
    plain = nn.ConvTranspose2d(last.in_channels, 1, 5, stride=1, padding=2).double()
    plain.load_state_dict(last.state_dict())
    reference.deconv[-1] = plain
    z = torch.randn(6, 4, dtype=torch.double)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    ya = decoder(za)
    h = reference.fc(zb).view(-1, 16, 7, 7)  # no layout change anywhere
    yb = reference.deconv(h).reshape(6, 1, 28, 28)
    assert ya.shape == yb.shape == (6, 1, 28, 28) and yb.is_contiguous()
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(za.grad, zb.grad)
    for (name, a), b in zip(decoder.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
