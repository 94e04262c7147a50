import pytest
import torch

from resist_mpi.models import PreActBlock, PreActResNet, create_model, list_models, module_tensors


def test_registry_and_paper_size():
    assert {"preact_resnet18", "preact_resnet34", "preact_resnet50", "preact_resnet101", "preact_resnet152",
            "preact_resnet200", "preact_resnet50_imagenet", "preact_resnet101_imagenet",
            "preact_resnet152_imagenet"} <= set(list_models())
    with torch.device("meta"):
        m = create_model("preact_resnet101", 100)
    assert sum(p.numel() for p in m.parameters()) == 41_397_924  # ~41.4 M as in the paper
    assert m.num_partitionable == 22
    with torch.device("meta"):
        assert create_model("preact_resnet152", 10).num_partitionable == 35
        assert create_model("preact_resnet200", 10).num_partitionable == 49
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")


def test_partitionable_are_non_strided_stage3_blocks():
    m = create_model("preact_resnet34", 10, width=4)
    assert m.partitionable == list(m.stages[2])[1:]
    assert all(b.conv1.stride == (1, 1) and b.shortcut is None for b in m.partitionable)
    m2 = create_model("preact_resnet34", 10, width=4, partition_stages=(1, 2))
    assert m2.num_partitionable == 3 + 5


def _thin(num_blocks, width=4):
    torch.manual_seed(0)
    return PreActResNet(PreActBlock, num_blocks, 10, width)


def test_switched_off_blocks_equal_model_built_without_them():
    torch.manual_seed(0)
    full = _thin([2, 2, 6, 2])
    keep = [1, 3]  # partitionable ids kept (stage-3 blocks 2 and 4)
    full.activate(keep)
    small = _thin([2, 2, 3, 2])  # stage 3: first block + the two kept ones
    src = [full.stages[2][0]] + [full.partitionable[i] for i in keep]
    sd = {}
    for name, t in full.state_dict().items():
        if not name.startswith("stages.2."):
            sd[name] = t
    for j, blk in enumerate(src):
        for name, t in blk.state_dict().items():
            sd[f"stages.2.{j}.{name}"] = t
    small.load_state_dict(sd)
    x = torch.randn(4, 3, 32, 32)
    full.eval(), small.eval()
    assert torch.equal(full(x), small(x))
    full.train(), small.train()
    assert torch.equal(full(x), small(x))


def test_inactive_block_costs_nothing_and_scale_applies():
    m = _thin([1, 1, 3, 1])
    x = torch.randn(2, 3, 32, 32)
    calls = []
    m.partitionable[0].register_forward_hook(lambda *a: calls.append(1))
    m.activate([1])
    m(x)
    assert calls == []
    m.activate_all()
    m.eval()
    # residual scale 0 makes every partitionable block the identity
    m.set_residual_scale(0.0)
    y0 = m(x)
    m.activate([])
    assert torch.allclose(y0, m(x), atol=1e-6)


def test_release_and_materialize_keep_shapes():
    m = _thin([1, 1, 3, 1])
    shapes = [t.shape for t in m.block_tensors(0)]
    n = m.block_numel(0)
    m.release_block(0)
    assert not m.holds_block(0) and all(t.is_meta for t in m.block_tensors(0))
    assert [t.shape for t in m.block_tensors(0)] == shapes and m.block_numel(0) == n
    m.materialize_block(0, "cpu")
    assert m.holds_block(0) and m.partitionable[0].bn1.num_batches_tracked.item() == 0


def test_a_block_brought_back_computes_and_trains_on_its_slab():
    """Release + materialize (the per-round rebinding) leaves a block that is its slab's values, in
    module_tensors order, and whose weights are trainable Parameters of the model."""
    m = _thin([1, 1, 3, 1])
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    y = m(x)
    values = torch.cat([t.detach().reshape(-1) for t in m.block_tensors(1)])
    for _ in range(3):  # repeated cycles reuse the same slots
        m.release_block(1)
        m.materialize_block(1, "cpu").copy_(values)
    m.activate_all()  # a released block is switched off
    assert torch.equal(m(x), y)
    m.train()
    m(x).sum().backward()
    block_params = list(m.partitionable[1].parameters())
    assert all(p.requires_grad and p.grad is not None for p in block_params)
    model_params = {id(p) for p in m.parameters()}
    assert all(id(p) in model_params for p in block_params)


def test_shared_and_block_tensors_partition_the_model():
    m = _thin([2, 2, 4, 2])
    ids = {id(t) for t in m.shared_tensors()}
    for b in range(m.num_partitionable):
        bt = {id(t) for t in m.block_tensors(b)}
        assert not bt & ids
        ids |= bt
    floats = [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
    assert ids == {id(t) for t in floats}


def test_shared_tensors_follow_replaced_tensors():
    """shared_tensors() reads cached slots; tensors replaced afterwards (to_empty) are what it returns."""
    m = _thin([2, 2, 4, 2])
    order = [t.shape for mod in m.shared_modules() for t in module_tensors(mod)]
    assert [t.shape for t in m.shared_tensors()] == order
    m.to_empty(device="cpu")
    now = [t for mod in m.shared_modules() for t in module_tensors(mod)]
    assert [id(t) for t in m.shared_tensors()] == [id(t) for t in now]


def test_imagenet_variant_runs_small_input():
    m = create_model("preact_resnet50_imagenet", 5, width=4)
    assert m.num_partitionable == 5
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_slabs_are_reused_and_trimmed():
    m = _thin([1, 1, 4, 1])
    m.release_block(0)
    slab = m.materialize_block(0, "cpu")
    assert m.block_slab(0) is slab and slab.numel() == m.block_numel(0)
    slab.fill_(3.0)
    assert all(torch.all(t == 3.0) for t in m.block_tensors(0))  # tensors are views of the slab
    ptr = slab.data_ptr()
    m.release_block(0)
    assert m.block_slab(0) is None and not m.holds_block(0)
    m.release_block(1)
    again = m.materialize_block(1, "cpu")
    assert again.data_ptr() == ptr  # the spare slab came back instead of a new allocation
    m.release_block(1)
    assert sum(len(v) for v in m._spares.values()) == 1
    m.trim_spares(0)  # memory goes back: no spare is kept
    assert sum(len(v) for v in m._spares.values()) == 0


def test_moving_a_built_block_into_a_slab_keeps_its_values_and_counters():
    m = _thin([1, 1, 3, 1])
    m.train()
    m(torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in m.partitionable[0].state_dict().items()}
    assert m.block_slab(0) is None
    slab = m.slab_of(0)
    assert m.block_slab(0) is slab
    after = m.partitionable[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included


def test_resist_takes_over_from_local_sgd_without_sharing_its_buffer():
    """After warm-up every block gets storage of its own, so dropping local SGD's flat buffer frees it."""
    from resist_mpi import comm
    from resist_mpi.config import Config
    from resist_mpi.strategies import LocalSGD, ResIST
    c = comm.init("self", fail_fast=False)
    warm = LocalSGD(c, Config(), torch.device("cpu"))
    model = warm.build_model(lambda: _thin([1, 1, 4, 1]))
    warm.end_round()  # the whole model becomes views of one flat buffer
    flat = warm._flats["model"]
    base, end = flat.data_ptr(), flat.data_ptr() + 4 * flat.numel()
    s = ResIST(c, Config(), torch.device("cpu"))
    s.adopt(model)
    for b in range(model.num_partitionable):
        slab = model.block_slab(b)
        assert slab is not None and not base <= slab.data_ptr() < end
    s.begin_round(0)
    s.end_round()
    shared = s._flats["shared"]
    assert not base <= shared.data_ptr() < end
