"""The CPU fast path (dpt_lab/fastpath.py): the same numbers as the plain PyTorch ops, used
where it should be and nowhere else, and packed weights that follow the model's weights."""

from __future__ import annotations

import gc

import pytest
import torch
from fixtures import OFFICIAL_NAMES, FixtureModels, small_input
from torch import nn

from dpt_lab import fastpath

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="no oneDNN in this torch build")

@pytest.fixture(scope="module")
def models(checkpoint_dir):
    """stem -> (its fixture model, a batch of two small inputs)."""
    load = FixtureModels(checkpoint_dir)
    return lambda stem: (load(stem), small_input(stem, batch=2))


def count_packs(monkeypatch) -> list:
    """Records every weight the fast path's linear layers run with."""
    seen = []
    real = fastpath.packed

    def spy(weight, *args, **kwargs):
        seen.append(weight)
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(fastpath, "packed", spy)
    return seen


@pytest.mark.parametrize("stem", sorted(OFFICIAL_NAMES))
def test_fast_path_gives_the_plain_ops_numbers(models, stem, monkeypatch):
    model, x = models(stem)
    seen = count_packs(monkeypatch)
    with torch.inference_mode():
        fast = model(x)
        with fastpath.disabled():
            plain = model(x)
    # every token-wise linear layer of the encoder ran packed (not the small position-bias MLPs)
    token_linears = {id(m.weight) for name, m in model.encoder.named_modules() if isinstance(m, nn.Linear)
                     and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2", "w12", "w3", "reduction")}
    assert token_linears and token_linears <= {id(w) for w in seen}
    scale = plain.abs().max().item()
    assert scale > 0
    assert (fast - plain).abs().max().item() <= 1e-5 * scale
    assert fastpath.ENABLED                                 # disabled() restored it


def test_fast_path_stays_off_where_it_must(models, monkeypatch):
    model, x = models("depth_anything_v2_vits")
    seen = count_packs(monkeypatch)
    model.requires_grad_(True)
    try:
        model(x).sum().backward()                           # autograd: the fused ops have no backward
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        model.requires_grad_(False).zero_grad(set_to_none=True)
    assert not seen
    with torch.no_grad():
        model(x)                                            # no autograd needed: it runs
    assert seen
    seen.clear()
    with torch.inference_mode(), fastpath.disabled():
        model(x)
    assert not seen
    traced = torch.jit.trace(model, x[:1], check_trace=False)   # tracing sees the plain ops
    assert not seen
    with torch.inference_mode():
        assert torch.allclose(traced(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-5)


def linear_layer(seed=0, n_in=24, n_out=40):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_packed_weight_is_made_once_and_follows_the_weight():
    fc = linear_layer()
    x = torch.randn(5, 24)
    with torch.inference_mode():
        first = fastpath.packed(fc.weight)
        assert fastpath.packed(fc.weight) is first
        torch.testing.assert_close(fastpath.linear(fc, x), fc(x), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        fc.weight.mul_(-2.0)                                # in place: version counter moves
    with torch.inference_mode():
        assert fastpath.packed(fc.weight) is not first
        torch.testing.assert_close(fastpath.linear(fc, x), fc(x), rtol=1e-5, atol=1e-6)

    fc.weight.data = torch.randn(40, 24)                    # new storage
    with torch.inference_mode():
        torch.testing.assert_close(fastpath.linear(fc, x), fc(x), rtol=1e-5, atol=1e-6)

    fc.load_state_dict(linear_layer(seed=3).state_dict())   # what loading weights does
    with torch.inference_mode():
        torch.testing.assert_close(fastpath.linear(fc, x), fc(x), rtol=1e-5, atol=1e-6)

    fc.weight.data.zero_()                                  # bypasses the counter: documented
    fastpath.release(fc)
    with torch.inference_mode():
        assert fastpath.linear(fc, x).abs().sub(fc.bias.abs()).abs().max() == 0


def test_packed_copies_go_with_their_weights(models):
    fc = linear_layer()
    with torch.inference_mode():
        fastpath.linear(fc, torch.randn(3, 24))
    key = id(fc.weight)
    assert key in fastpath._packs
    del fc
    gc.collect()
    assert key not in fastpath._packs

    model, x = models("depth_anything_v1_vits")
    with torch.inference_mode():
        model(x)
    ids = {id(p) for p in model.parameters()}
    assert ids & set(fastpath._packs)
    model.double()                                          # a dtype change releases them
    assert not ids & set(fastpath._packs)
    with torch.inference_mode():
        assert model(x.double()).dtype == torch.float64     # not the fast path, still runs
    model.float()


def test_pack_weights_switch_and_inference_tensor_weights(monkeypatch):
    with torch.inference_mode():
        fc = linear_layer()                                 # weights made in inference mode
        x = torch.randn(7, 24)
        packed = fastpath.linear(fc, x)
        monkeypatch.setattr(fastpath, "PACK_WEIGHTS", False)
        assert fastpath.packed(fc.weight) is fc.weight
        torch.testing.assert_close(fastpath.linear(fc, x), packed, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fastpath.linear(fc, x, gelu=True), torch.nn.functional.gelu(fc(x)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,cin,cout,batch", [(4, 48, 48, 1), (2, 96, 96, 2), (3, 5, 7, 2)])
def test_conv_transpose_as_a_matmul(k, cin, cout, batch):
    torch.manual_seed(k)
    conv = nn.ConvTranspose2d(cin, cout, k, stride=k)
    x = torch.randn(batch, cin, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, want = fastpath.conv_transpose(conv, x), conv(x)
        got_nchw = fastpath.conv_transpose(conv, x.contiguous())
    assert got.shape == want.shape == (batch, cout, 9 * k, 11 * k)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_nchw, want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_falls_back_where_it_does_not_fit():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, 8)
    for conv in (nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), nn.ConvTranspose2d(6, 4, 3, stride=3, groups=2)):
        with torch.inference_mode():
            assert torch.equal(fastpath.conv_transpose(conv, x), conv(x))


@pytest.mark.parametrize("patch,size", [(14, (42, 56)), (16, (40, 64)), (4, (12, 8))])
def test_patch_tokens_match_the_patch_conv(patch, size):
    torch.manual_seed(patch)
    conv = nn.Conv2d(3, 24, patch, stride=patch)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        got = fastpath.patch_tokens(conv, x)
        with fastpath.disabled():
            plain = fastpath.patch_tokens(conv, x)
    want = conv(x).flatten(2).transpose(1, 2)
    assert got.shape == plain.shape == (2, (size[0] // patch) * (size[1] // patch), 24)
    assert torch.equal(plain, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fastpath_conv2d_module():
    torch.manual_seed(1)
    plain = nn.Conv2d(48, 64, 3, padding=1, bias=False)
    fast = fastpath.Conv2d(48, 64, 3, padding=1, bias=False)
    fast.load_state_dict(plain.state_dict())                 # same parameters, same keys
    x = torch.randn(2, 48, 20, 24)
    with torch.inference_mode():
        got, want = fast(x), plain(x)
        assert got.is_contiguous(memory_format=torch.channels_last)      # the fast path ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast(x), plain(x))                   # autograd on: the plain op
    odd = fastpath.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")  # does not fit: the module's own op
    ref = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    ref.load_state_dict(odd.state_dict())
    y = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        assert torch.equal(fastpath.conv(odd, y), ref(y))


def test_packed_copies_stay_under_the_limit_and_are_counted(monkeypatch):
    base = fastpath.packed_bytes()
    size = 40 * 24 * 4
    monkeypatch.setattr(fastpath, "PACK_LIMIT_BYTES", base + size + 10)      # room for one
    first, second = linear_layer(1), linear_layer(2)
    x = torch.randn(5, 24)
    with torch.inference_mode():
        for fc in (first, second):
            torch.testing.assert_close(fastpath.linear(fc, x), fc(x), rtol=1e-5, atol=1e-6)
    assert fastpath.packed(first.weight) is not first.weight               # packed
    assert fastpath.packed(second.weight) is second.weight                 # over the limit: as it is
    assert fastpath.packed_bytes() == base + size
    del first
    gc.collect()
    assert fastpath.packed_bytes() == base                                  # went with its weight
    with torch.inference_mode():
        assert fastpath.packed(second.weight) is not second.weight          # room again
    fastpath.release(second)
    assert fastpath.packed_bytes() == base


def test_packing_from_many_threads_at_once():
    import threading

    base = fastpath.packed_bytes()
    fc = linear_layer(5, n_in=256, n_out=512)
    x = torch.randn(3, 256)
    want = fc(x).detach()
    results, start = [], threading.Barrier(8)

    def run():
        start.wait()
        with torch.inference_mode():
            results.append(fastpath.linear(fc, x))

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fastpath.packed_bytes() == base + 512 * 256 * 4                  # one copy, counted once
    fastpath.release(fc)
    assert fastpath.packed_bytes() == base


def test_linear_keeps_autograd_for_a_bias_that_needs_it():
    fc = linear_layer(6).requires_grad_(False)
    bias = torch.randn(40, requires_grad=True)               # BEiT / SwinV2 build their qkv bias
    x = torch.randn(4, 24)
    y = fastpath.linear(fc, x, bias=bias)
    assert torch.equal(y, torch.nn.functional.linear(x, fc.weight, bias))   # the plain op, exactly
    y.sum().backward()
    assert bias.grad is not None and torch.equal(bias.grad, torch.full((40,), 4.0))
    with torch.no_grad():
        torch.testing.assert_close(fastpath.linear(fc, x, bias=bias), y.detach(), rtol=1e-5, atol=1e-6)


def test_disabled_in_one_thread_leaves_another_on_the_fast_path(models):
    import threading

    model, x = models("depth_anything_v2_vits")
    with torch.inference_mode():
        fast = model(x)
        with fastpath.disabled():
            plain = model(x)
    assert not torch.equal(fast, plain)            # the two paths differ in their last bits
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def plain_thread():
        with fastpath.disabled():
            inside.set()
            seen["plain_enabled"] = fastpath.enabled()
            release.wait(60)

    t = threading.Thread(target=plain_thread)
    t.start()
    assert inside.wait(60)
    try:
        seen["other_enabled"] = fastpath.enabled()
        with torch.inference_mode():
            other = model(x)                        # while the first thread is inside disabled()
    finally:
        release.set()
        t.join()
    assert seen == {"plain_enabled": False, "other_enabled": True}
    assert torch.equal(other, fast)


def test_only_small_models_pack_their_weights(models, monkeypatch):
    model, x = models("depth_anything_v2_vits")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # the default: ViT-S (~100 MB of weights) packs; ViT-B and ViT-L (0.4, 1.3 GB) do not
    assert fastpath.PACK_MODEL_MAX_BYTES == 256 << 20 and fastpath.packs(model)
    fastpath.release(model)
    gc.collect()
    before = fastpath.packed_bytes()
    monkeypatch.setattr(fastpath, "PACK_MODEL_MAX_BYTES", weights - 1)    # this model is "large"
    with torch.inference_mode():
        large = model(x)
    assert fastpath.packed_bytes() == before
    monkeypatch.setattr(fastpath, "PACK_MODEL_MAX_BYTES", weights)        # now it is small enough
    with torch.inference_mode():
        small = model(x)
    assert fastpath.packed_bytes() > before
    assert (large - small).abs().max().item() <= 1e-5 * small.abs().max().item()


@pytest.mark.parametrize("stem", ["depth_anything_v2_vits", "depth_anything_v2_metric_vits"])
def test_the_head_in_bands_gives_the_plain_ops_numbers(models, stem, monkeypatch):
    """The head's two upsamplings run in bands of rows (conv1 from the finest fusion block's
    output before its upsampling, conv2 from conv1's): many short bands and both image edges:
    the numbers of the plain ops."""
    from dpt_lab import decoder

    model, x = models(stem)
    bands = []
    real = decoder.upsampled_conv_bands

    def spy(x, size, conv, band_rows, relu=False):
        for r0, r1, y in real(x, size, conv, band_rows, relu):
            bands.append((conv, r0, r1, size[0]))
            yield r0, r1, y

    monkeypatch.setattr(decoder, "upsampled_conv_bands", spy)
    monkeypatch.setattr(decoder.DepthHead, "BAND_ROWS", 5)
    monkeypatch.setattr(decoder.DepthHead, "BAND_BYTES", 1)      # conv1: 4 rows a band
    with torch.inference_mode():
        fast = model(x)
        with fastpath.disabled():
            plain = model(x)
    head = model.decoder.head
    for conv, rows in ((head.conv1, 4), (head.conv2, 5)):
        mine = [b for b in bands if b[0] is conv]
        height = mine[0][3]
        assert [b[1] for b in mine] == list(range(0, height, rows)) and mine[-1][2] == height
    scale = plain.abs().max().item()
    assert (fast - plain).abs().max().item() <= 1e-5 * scale
