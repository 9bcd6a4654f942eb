"""The native tower (``olmo_tap.model.native_layer``): a pass of one tower with every kernel native runs as bare
ops, and gives every hidden state and every cached key and value the bits of the general path."""

from __future__ import annotations

import pytest
import torch

from olmo_tap import HydraTransformerConfig, TransformerConfig
from olmo_tap.model import kernels, native_attention, native_layer
from olmo_tap.model.kv_cache import Rows
from olmo_tap.quant.model import quantize_model


def model_for(family: str, weights: str):
    """A random 2-layer Hydra (trunk 1, heads 1 x 3) big enough that its fp32 weights are packed for the native
    kernel (``layers.PACK_MIN_ELEMENTS``), with inputs a multiple of 32 for the quantized one."""
    config = TransformerConfig(family, 40, 256, 2, 4, 2, 64, 256, 10000.0, 1e-5, False, 64)
    torch.manual_seed(11)
    model = HydraTransformerConfig.split(config, 3, 1).build()
    with torch.no_grad():
        for block in [*model.trunk, *model.heads]:
            block.reset_parameters(std=0.05)
            for norm in block.children():  # norms away from 1, so a wrongly picked weight shows
                norm.weight.uniform_(0.5, 1.5)
    model = model.eval()
    return quantize_model(model, weights) if weights != "fp32" else model


def decode(model, batch: bool) -> list[torch.Tensor]:
    """Prompts of 3 rows, then steps at different positions (the trunk, then each row through its own head, and a
    lone head) and a 4-token pass per row as verification runs it: every output and the whole cache."""
    torch.manual_seed(0)
    cache = model.new_cache(3, 64)
    for layer in [*cache.trunk, *cache.heads]:  # never read before written, so not zeroed: zeroed to compare
        layer.k.zero_(), layer.v.zero_()
    outs = []
    with torch.no_grad(), kernels.batch_arithmetic(batch):
        prompts = Rows.of([0, 1, 2], [0, 0, 0], [5, 3, 7])
        trunk = model.trunk_rows(torch.randint(0, 40, (15,)), prompts, cache)
        outs.append(model.heads_rows(trunk, range(0, 3), prompts, cache))
        for step in range(3):
            rows = Rows.of([0, 1, 2], [5 + step, 3 + step, 7 + step], [1, 1, 1])
            trunk = model.trunk_rows(torch.randint(0, 40, (3,)), rows, cache)
            outs += [trunk, model.heads_rows_each(trunk, [0, 1, 2], rows, cache)]
            lone = Rows.of([1], [3 + step], [1])
            outs.append(model.heads_rows(trunk[1:2], range(2, 3), lone, cache))
        verify = Rows.of([0, 1, 2], [8, 6, 10], [4, 4, 4])
        trunk = model.trunk_rows(torch.randint(0, 40, (12,)), verify, cache)
        outs += [trunk, model.heads_rows_each(trunk, [0, 1, 2], verify, cache)]
        outs.append(model.heads_rows(trunk[4:8], range(1, 2), Rows.of([1], [6], [4]), cache))
    return outs + [t for layer in [*cache.trunk, *cache.heads] for t in (layer.k, layer.v)]


@pytest.mark.parametrize("weights", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "olmo2"])
@pytest.mark.parametrize("batch", [False, True])
def test_native_towers_give_the_general_paths_bits(monkeypatch, one_thread, family, weights, batch):
    model = model_for(family, weights)
    taken = []
    forward = native_layer.NativeStack.forward
    monkeypatch.setattr(native_layer.NativeStack, "forward", lambda self, *a: taken.append(1) or forward(self, *a))
    fast = decode(model, batch)
    # the prompts' trunk; 3 steps x (trunk, 3 heads each on its rows, a lone head); the 4-token passes (trunk, 3 heads
    # each on its rows, one head); not the prompts' pass of 3 heads at once
    assert len(taken) == 21, "the native towers were not taken where they apply"
    monkeypatch.setattr(native_layer, "pass_routes", lambda *a: None)
    general = decode(model, batch)
    assert len(fast) == len(general)
    for i, (a, b) in enumerate(zip(fast, general, strict=True)):
        assert torch.equal(a, b), f"output {i} differs"


def test_a_changed_weight_rebuilds_the_tower(one_thread):
    model = model_for("llama", "fp32")
    block = model.trunk[0]
    routes = (kernels.epoch(), "native", "native")
    first = block.native_tower(0, routes)
    assert first is not None and block.native_tower(0, routes) is first
    with torch.no_grad():
        block.attn_norm.weight.mul_(2.0)  # an in-place update (a LoRA merge, a loader) bumps the version
    second = block.native_tower(0, routes)
    assert second is not first and torch.equal(second.norms[0], block.attn_norm.weight[0])


def test_other_passes_keep_the_general_path(monkeypatch):
    model = model_for("llama", "fp32")
    cache = model.new_cache(1, 64)
    x = torch.zeros(1, 3, 256)
    rows = Rows.of([0], [0], [3])
    layer = cache.trunk[0]
    with torch.no_grad():
        assert native_layer.pass_routes(x, slice(0, 1), rows, layer) is not None
        assert native_layer.pass_routes(x, slice(0, 1), rows, None) is None  # uncached
        assert native_layer.pass_routes(x.expand(2, 3, 256), slice(0, 2), rows, layer) is None  # two towers at once
        long = Rows.of([0], [0], [native_attention.SMALL_QUERY + 1])
        assert native_layer.pass_routes(torch.zeros(1, 17, 256), slice(0, 1), long, layer) is None  # a prompt
        assert native_layer.pass_routes(x.bfloat16(), slice(0, 1), rows, layer) is None
        monkeypatch.setenv("OLMO_TAP_NORM", "torch")
        assert native_layer.pass_routes(x, slice(0, 1), rows, layer) is None
    assert native_layer.pass_routes(x, slice(0, 1), rows, layer) is None  # autograd on


def test_info_says_whether_decode_passes_take_the_op(monkeypatch):
    model = model_for("llama", "int4")
    assert native_layer.status(model).startswith("one native op")
    monkeypatch.setenv("OLMO_TAP_ATTENTION", "torch")
    assert native_layer.status(model) == "per operator (attention on torch's route)"


def test_a_strided_input_gets_the_same_bits(monkeypatch, one_thread):
    model = model_for("llama", "int8")
    outs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(native_layer, "pass_routes", lambda *a: None)
        cache = model.new_cache(1, 64)
        torch.manual_seed(1)
        with torch.no_grad():
            model.heads_rows(model.trunk_rows(torch.randint(0, 40, (5,)), Rows.of([0], [0], [5]), cache), range(0, 1),
                             Rows.of([0], [0], [5]), cache)  # fmt: skip
            strided = torch.randn(2, 512)[:, ::2]  # rows of 256 a stride of 2 apart
            outs.append(model.heads_rows(strided, range(0, 1), Rows.of([0], [5], [2]), cache))
    assert torch.equal(outs[0], outs[1])


def test_an_op_that_cannot_be_built_leaves_the_layers_one_by_one(monkeypatch, tmp_path, one_thread):
    from olmo_tap.native import NativeKernel

    model = model_for("olmo2", "int4")
    built = decode(model, batch=True)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native_layer, "_KERNEL", NativeKernel(broken, "broken_layer_test", "test kernel"))
    model = model_for("olmo2", "int4")  # no tower built before the kernel broke
    assert native_layer.status(model).startswith("per operator (")
    unbuilt = decode(model, batch=True)
    assert all(torch.equal(a, b) for a, b in zip(built, unbuilt, strict=True))
