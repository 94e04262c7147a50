"""resist_mpi.blocks: finding residual blocks in any model, switching them, scaling them, storing them."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import resist_mpi as rm
from resist_mpi.blocks.kinds import BlockError
from resist_mpi.strategies.store import BlockStore
from resist_mpi.blocks.switch import activate, make_switchable, set_scale
from resist_mpi.blocks.find import find_blocks
from resist_mpi.blocks.tensors import module_keys, module_tensors, shared_keys, shared_slots, tensor_slots
from resist_mpi.models import PreActBlock, PreActResNet, create_model
from cases import library as L


def _switch_all(model, blocks="auto", stages=None):
    named = find_blocks(model, blocks, stages)
    for name, b in named:
        make_switchable(b, name)
    return [b for _, b in named]


def _thin(num_blocks, width=4):
    torch.manual_seed(0)
    return PreActResNet(PreActBlock, num_blocks, 10, width)


# -- finding -------------------------------------------------------------------------------------------------
def test_auto_finds_non_downsampling_blocks_of_the_chosen_stages():
    m = _thin([3, 4, 6, 3])
    assert [n for n, _ in find_blocks(m)] == [f"stages.2.{i}" for i in range(1, 6)]
    assert [n for n, _ in find_blocks(m, stages=(1, 2))] == ["stages.0.0", "stages.0.1", "stages.0.2",
                                                              "stages.1.1", "stages.1.2", "stages.1.3"]
    tv = torchvision.models.resnet50(num_classes=10)
    assert [n for n, _ in find_blocks(tv)] == [f"layer3.{i}" for i in range(1, 6)]
    wide = torchvision.models.wide_resnet50_2(num_classes=10)
    assert len(find_blocks(wide, stages=(2, 3))) == 3 + 5
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 4, enable_nested_tensor=False)
    assert [n for n, _ in find_blocks(nn.Sequential(nn.Linear(8, 16), enc))] == [f"1.layers.{i}" for i in range(4)]
    with pytest.raises(BlockError, match="stages 1..4"):
        find_blocks(m, stages=(5,))
    with pytest.raises(BlockError, match="found no residual stack in Sequential"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_explicit_blocks_by_module_or_name_and_non_residual_refused():
    tv = torchvision.models.resnet18(num_classes=10)
    assert [n for n, _ in find_blocks(tv, ["layer2.1", tv.layer1[0]])] == ["layer1.0", "layer2.1"]  # model order
    with pytest.raises(BlockError, match=r"^block layer2.0 \(BasicBlock\) is not residual: it has a downsample"):
        find_blocks(tv, ["layer2.0"])
    with pytest.raises(BlockError, match="no module named 'layer9'"):
        find_blocks(tv, ["layer9"])
    m = _thin([1, 2, 2, 1])
    with pytest.raises(BlockError, match=r"stages.1.0 \(PreActBlock\) is not residual: it has a shortcut"):
        find_blocks(m, ["stages.1.0"])


# -- switching and scaling -------------------------------------------------------------------------------------
def test_switched_off_blocks_equal_model_built_without_them():
    full = _thin([2, 2, 6, 2])
    blocks = _switch_all(full)
    keep = [1, 3]  # partitionable ids kept (stage-3 blocks 2 and 4)
    activate(blocks, keep)
    small = _thin([2, 2, 3, 2])  # stage 3: first block + the two kept ones
    sd = {k: t for k, t in full.state_dict().items() if not k.startswith("stages.2.")}
    for j, blk in enumerate([full.stages[2][0]] + [blocks[i] for i in keep]):
        sd.update({f"stages.2.{j}.{k}": t for k, t in blk.state_dict().items()})
    small.load_state_dict(sd)
    x = torch.randn(4, 3, 32, 32)
    for mode in (False, True):
        full.train(mode), small.train(mode)
        assert torch.equal(full(x), small(x))


def test_inactive_block_costs_nothing_and_full_scale_is_the_blocks_own_code():
    m = _thin([1, 1, 3, 1])
    ref = copy.deepcopy(m)
    blocks = _switch_all(m)
    calls = []
    blocks[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    activate(blocks, [1])
    x = torch.randn(2, 3, 32, 32)
    m.eval(), ref.eval()
    m(x)
    assert calls == []  # not even its first conv ran
    activate(blocks, range(2))
    assert torch.equal(m(x), ref(x))  # active at scale 1: bit for bit the unswitched model


@pytest.mark.parametrize("kind", ["preact", "tv_basic", "tv_bottleneck", "transformer_pre", "transformer_post"])
def test_scaled_branch_before_the_addition(kind):
    """At scale s a block computes its residual form with the branch times s before the addition,
    whatever follows it (torchvision: the ReLU after the addition; post-norm transformers: the norm)."""
    torch.manual_seed(0)
    s = 0.25
    if kind == "preact":
        blk = PreActBlock(8, 8).eval()
        x = torch.randn(2, 8, 6, 6)
        want = x + s * blk.residual(F.relu(blk.bn1(x)))
    elif kind.startswith("tv"):
        cls = torchvision.models.resnet.BasicBlock if kind == "tv_basic" else torchvision.models.resnet.Bottleneck
        blk = cls(32, 32 // cls.expansion).eval()
        x = torch.randn(2, 32, 6, 6)
        pre = blk.bn1(blk.conv1(x))  # the branch, written out from the layers
        if kind == "tv_basic":
            pre = blk.bn2(blk.conv2(F.relu(pre)))
        else:
            pre = blk.bn3(blk.conv3(F.relu(blk.bn2(blk.conv2(F.relu(pre))))))
        want = F.relu(s * pre + x)
    else:
        blk = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                         norm_first=kind == "transformer_pre").eval()
        x = torch.randn(2, 5, 16)
        if blk.norm_first:
            h = x + s * blk._sa_block(blk.norm1(x), None, None)
            want = h + s * blk._ff_block(blk.norm2(h))
        else:
            h = blk.norm1(x + s * blk._sa_block(x, None, None))
            want = blk.norm2(h + s * blk._ff_block(h))
    unscaled = blk(x)
    sw = make_switchable(blk)
    assert torch.equal(blk(x), unscaled)
    sw.scale = s
    assert torch.allclose(blk(x), want, atol=1e-6)
    sw.scale = 0.0  # no branch at all: what is left is the identity (through the post-addition op)
    tail = {"preact": lambda t: t, "tv_basic": F.relu, "tv_bottleneck": F.relu, "transformer_pre": lambda t: t,
            "transformer_post": lambda t: blk.norm2(blk.norm1(t))}[kind]
    assert torch.allclose(blk(x), tail(x), atol=1e-6)


def test_generic_block_scaled_and_not_residual_caught_at_forward():
    class Res(nn.Module):
        def __init__(self, d_out=4):
            super().__init__()
            self.lin = nn.Linear(4, d_out)

        def forward(self, x):
            return x + self.lin(x) if self.lin.out_features == 4 else self.lin(x)

    model = nn.Sequential(Res(), Res(), Res(3))
    blocks = _switch_all(model, ["0", "2"])
    x = torch.randn(3, 4)
    set_scale(blocks, 0.5)
    assert torch.allclose(blocks[0](x), x + 0.5 * model[0].lin(x), atol=1e-6)
    with pytest.raises(BlockError, match=r"block 2 is not residual: its input \(3, 4\) and output \(3, 3\)"):
        blocks[1](x)


def test_a_switched_model_deep_copies_into_an_independent_model():
    m = _thin([1, 1, 3, 1])
    blocks = _switch_all(m)
    twin = copy.deepcopy(m)
    twin_blocks = [twin.stages[2][1], twin.stages[2][2]]
    activate(twin_blocks, [])  # switching the copy leaves the original alone
    assert all(b._resist_switch.active for b in blocks)
    with torch.no_grad():
        twin_blocks[0].conv1.weight.fill_(0)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), twin.eval()
    activate(twin_blocks, [0, 1])
    assert not torch.equal(m(x), twin(x))  # the copy computes with its own weights


# -- storage ------------------------------------------------------------------------------------------------
def test_release_and_materialize_keep_shapes_and_reset_counters():
    m = _thin([1, 1, 3, 1])
    store = BlockStore(_switch_all(m))
    shapes = [t.shape for t in store.tensors(0)]
    n = store.numel(0)
    assert n == sum(t.numel() for t in module_tensors(store.blocks[0]))
    params = list(store.blocks[0].parameters())
    store.release(0)
    # released: no storage (empty placeholders), but the very same Parameter objects
    assert not store.holds(0) and all(t.numel() == 0 for t in store.tensors(0))
    assert all(p is q for p, q in zip(store.blocks[0].parameters(), params))
    assert store.numel(0) == n
    store.materialize(0, "cpu")
    assert store.holds(0) and store.blocks[0].bn1.num_batches_tracked.item() == 0
    assert [t.shape for t in store.tensors(0)] == shapes
    assert all(p is q for p, q in zip(store.blocks[0].parameters(), params))


def test_an_optimizer_built_once_follows_blocks_that_leave_and_come_back():
    """The optimizer holds the same Parameters throughout: a released block has no gradient (SGD
    skips it, weight decay and momentum included) and its placeholder never aliases a live block."""
    m = _thin([1, 1, 4, 1])
    blocks = _switch_all(m)
    store = BlockStore(blocks)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(4, 3, 32, 32)
    m(x).sum().backward()
    opt.step()  # every block has momentum now
    saved1 = store.slab(1).clone()
    store.release(0)
    store.release(1)
    store.materialize(1, "cpu").copy_(saved1)  # block 1 comes back, into block 0's old slab
    assert store.slab(1).data_ptr() != store.slab(2).data_ptr()
    opt.zero_grad(set_to_none=False)  # only existing gradients are zeroed: released blocks have none
    assert all(p.grad is None for b in (0, 1) for p in blocks[b].parameters())
    before = {b: store.slab(b).clone() for b in (1, 2)}
    opt.step()  # stale momentum exists for blocks 0 and 1: without a gradient, SGD applies none of it
    assert all(p.numel() == 0 for p in blocks[0].parameters())
    assert torch.equal(store.slab(1), before[1])
    nparams = sum(p.numel() for p in blocks[2].parameters())
    assert not torch.equal(store.slab(2)[:nparams], before[2][:nparams])  # the held block kept training
    assert torch.equal(store.slab(2)[nparams:], before[2][nparams:])  # its BN statistics: untouched


def test_slabs_are_reused_and_trimmed():
    m = _thin([1, 1, 4, 1])
    store = BlockStore(_switch_all(m))
    store.release(0)
    slab = store.materialize(0, "cpu")
    assert store.slab(0) is slab and slab.numel() == store.numel(0)
    slab.fill_(3.0)
    assert all(torch.all(t == 3.0) for t in store.tensors(0))  # tensors are views of the slab
    ptr = slab.data_ptr()
    store.release(0)
    store.release(1)
    assert store.materialize(1, "cpu").data_ptr() == ptr  # the spare came back, no new allocation
    store.release(1)
    assert sum(len(v) for v in store._spares.values()) == 1  # block 1 had no slab of its own before
    store.trim_spares(0)
    assert sum(len(v) for v in store._spares.values()) == 0


def test_moving_a_built_block_into_a_slab_keeps_its_values_and_counters():
    m = _thin([1, 1, 3, 1])
    store = BlockStore(_switch_all(m))
    m.train()
    m(torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in store.blocks[0].state_dict().items()}
    slab = store.slab(0)
    assert store.slab(0) is slab
    after = store.blocks[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included


def test_shared_and_block_tensors_partition_the_model():
    tv = torchvision.models.resnet18(num_classes=10)
    blocks = _switch_all(tv, stages=(1, 2, 3, 4))
    assert len(blocks) == 5  # layer1's two, and the second block of layers 2-4
    ids = {id(d[n]) for d, n in shared_slots(tv, blocks)}
    for b in blocks:
        bt = {id(t) for t in module_tensors(b)}
        assert not bt & ids
        ids |= bt
    assert ids == {id(t) for t in module_tensors(tv)}


def test_a_tied_tensor_is_listed_once_under_its_first_name():
    """An embedding tied to the output layer is one Parameter under two names: the shared layers,
    their state_dict keys and a block's slots list it once, as module.parameters() does (twice, it
    was averaged twice and no flat buffer could keep it as a view)."""
    lm = L.make_tied_model()
    blocks = _switch_all(lm)
    assert len(blocks) == 4 and lm.head.weight is lm.emb.weight
    assert [id(d[n]) for d, n in shared_slots(lm, blocks)] == [id(lm.emb.weight)]
    assert shared_keys(lm, blocks) == ["emb.weight"]
    held = lm.state_dict(keep_vars=True)
    assert [id(held[k]) for k in module_keys(lm)] == [id(t) for t in module_tensors(lm)]
    block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    block[1].weight = block[0].weight
    assert [id(d[n]) for d, n in tensor_slots(block)] == [id(t) for t in module_tensors(block)]
    store = BlockStore([block])
    assert store.slab(0).numel() == 16 + 4 + 4 and block[1].weight is block[0].weight
    assert block[0].weight.data_ptr() == store.slab(0).data_ptr()


def test_store_works_on_transformer_layers():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 3,
                                enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    y = enc(x)
    blocks = _switch_all(enc)
    store = BlockStore(blocks)
    saved = [store.slab(b).clone() for b in range(3)]
    for b in range(3):
        store.release(b)
    activate(blocks, [])
    assert torch.equal(enc(x), x)  # every layer off: the identity
    for b in range(3):
        store.materialize(b, "cpu").copy_(saved[b])
    activate(blocks, range(3))
    assert torch.equal(enc(x), y)


def test_create_model_builds_on_meta_for_other_ranks():
    with torch.device("meta"):
        m = create_model("preact_resnet34", 10, width=4)
    store = BlockStore(_switch_all(m))
    assert not any(store.holds(b) for b in range(len(store)))
    params = list(m.parameters())
    store.release(0)  # a meta block becomes a placeholder on the device, keeping its Parameters
    assert not store.holds(0) and all(not t.is_meta and t.numel() == 0 for t in store.tensors(0))
    slab = store.materialize(0, "cpu")
    assert store.holds(0) and all(p is q for p, q in zip(m.parameters(), params))
    assert store.tensors(0)[0].data_ptr() == slab.data_ptr()


def test_a_run_on_the_packages_model_and_the_digits_imports_neither_torchvision_nor_scikit_learn(tmp_path):
    """Each rank of every launch starts faster by about 2 s: torchvision's blocks are registered once
    their module is imported (no instance can exist before), the digits read without scikit-learn."""
    import subprocess
    import sys
    code = ("import runpy, sys\n"
            "sys.argv = ['train', '--config', 'configs/demo.yaml', '--epochs', '1', '--local-steps', '2', '--batch-size', '128',"
            " '--width', '4', '--progress', 'off', '--out', sys.argv[1]]\n"
            "try:\n    runpy.run_module('resist_mpi.train', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('imported:', sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))\n")
    from helpers import ROOT
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "imported: []", out.stdout[-2000:]


def test_a_users_registration_of_a_torchvision_block_is_kept():
    from resist_mpi.blocks import kinds

    def scaled(block, s, x):
        return x
    saved = dict(kinds._KINDS)
    try:
        kinds._KINDS.clear()  # a fresh process: the user registers before any block is looked up
        kinds._BUILTIN.update(resist_mpi=False, torchvision=False)
        kinds.register_block(torchvision.models.resnet.BasicBlock, scaled, name="mine")
        block = torchvision.models.resnet18().layer1[0]
        assert kinds.block_kind(block).name == "mine"
        # the package's own kinds are there as well (they were skipped once a user had registered one)
        assert kinds.block_kind(_thin([1, 2, 2, 1]).stages[2][1]).name == "PreActBlock"
        assert kinds.block_kind(torchvision.models.resnet50().layer1[1]).name == "torchvision Bottleneck"
    finally:
        kinds._KINDS.clear()
        kinds._KINDS.update(saved)
        kinds._BUILTIN.update(resist_mpi=True, torchvision=True)


class _Step(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(x)


class _Chain(torch.nn.Module):
    """Four residual blocks between two shared layers; `case` adds what a block cannot carry."""

    def __init__(self, case=None, d=4):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, 2)
        self.blocks = torch.nn.ModuleList(_Step(d) for _ in range(4))
        self.register_buffer("order", torch.tensor([3, 1, 2, 0]))  # shared: an integer buffer
        if case == "tied_shared":
            self.inp.weight = self.blocks[0].lin.weight
        elif case == "tied_blocks":
            self.blocks[1].lin.weight = self.blocks[0].lin.weight
        elif case == "int_buffer":
            self.blocks[2].register_buffer("perm", torch.arange(3, -1, -1))
        elif case == "tied_module":  # a whole module of a block, used outside it too
            self.last = self.blocks[3].lin
        elif case == "non_persistent":
            self.blocks[1].lin.register_buffer("gain", torch.full((d,), 0.5), persistent=False)
        elif case == "no_tensors":
            self.blocks[2] = torch.nn.Tanh()
        self.case = case

    def forward(self, x):
        x = self.inp(x)[:, self.order]
        for b in self.blocks:
            x = b(x)
        if self.case == "tied_module":
            x = self.last(x)
        return self.out(x)


@pytest.mark.parametrize("case, message", [
    ("tied_shared", "ResIST: inp.weight is also a tensor of blocks.0 (tied)"),
    ("tied_blocks", "ResIST: blocks.1.lin.weight is also a tensor of blocks.0 (tied)"),
    ("int_buffer", "ResIST: block blocks.2 holds the torch.int64 buffer perm: a block moves as its parameters and "
                   "float buffers, so it would arrive as zeros"),
    ("tied_module", "ResIST: last.weight is also a tensor of blocks.3 (tied)"),
    ("non_persistent", "ResIST: block blocks.1 holds the non-persistent buffer blocks.1.lin.gain: a state_dict() "
                       "leaves it out, so a resume would leave it unset"),
    ("no_tensors", "ResIST: block blocks.2 holds no parameter or float buffer"),
], ids=["tied_shared", "tied_blocks", "int_buffer", "tied_module", "non_persistent", "no_tensors"])
def test_a_block_whose_tensors_are_not_its_own_is_refused_on_every_rank(case, message):
    """A weight tied between a block and a shared layer (or two blocks) became an empty placeholder
    in the other place when its block moved away ("mat2 must be a matrix"), and a block's integer
    buffer arrived as zeros. A whole module of a block used outside it passed the check (the ranks
    without the block then ran it on empty tensors: "Expected weight to be of same shape"); a
    non-persistent buffer came back from a resume as whatever memory the block's slab held (zeros,
    which the next exchange carried on); a block without tensors ended in an IndexError."""
    from resist_mpi.comm.thread import run_ranks

    def body(c):
        torch.manual_seed(0)
        try:
            rm.ResIST(_Chain(case), c, blocks=[f"blocks.{i}" for i in range(4)])
        except rm.UsageError as e:
            return str(e)
    assert all(m is not None and m.startswith(message) for m in run_ranks(2, body)), run_ranks(2, body)


def test_ranks_that_build_on_the_meta_device_get_the_shared_integer_buffers_of_rank_0():
    """The initial broadcast carries float tensors: ranks 1-3 had order = [0, 0, 0, 0]."""
    from resist_mpi.comm.thread import run_ranks
    torch.manual_seed(0)
    real = _Chain()
    with torch.device("meta"):
        metas = [_Chain() for _ in range(3)]

    def body(c):
        model = real if c.rank == 0 else metas[c.rank - 1]
        rm.ResIST(model, c, blocks=[f"blocks.{i}" for i in range(4)], device="cpu")
        return model.order.tolist()
    assert run_ranks(4, body) == [[3, 1, 2, 0]] * 4


class _SEBlock(torchvision.models.resnet.BasicBlock):
    """A user's block on torchvision's, with a squeeze-excitation gate in its own forward."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        c = self.conv2.out_channels
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid())

    def branch(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return out * self.se(out)

    def forward(self, x):
        return self.relu(self.branch(x) + x)


def test_a_subclass_with_a_forward_of_its_own_is_not_taken_for_its_parents_kind():
    """A block derived from torchvision's BasicBlock with a forward of its own (an SE gate) got the
    parent's scaled form: trained with its own forward, evaluated (scale 1/S) without its gate.
    Now it is not of that kind: `auto` says so in one line, and passed explicitly it is a generic
    residual block, whose scaled form keeps the gate (at scale 1 it is the block's own output)."""
    from resist_mpi.blocks import kinds
    torch.manual_seed(0)
    block = _SEBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6)
    assert kinds.block_kind(block) is None and kinds.overridden_kind(block) == "torchvision BasicBlock"
    assert kinds.block_kind(torchvision.models.resnet.BasicBlock(8, 8)).name == "torchvision BasicBlock"
    assert kinds.block_kind(_thin([1, 2, 2, 1]).stages[2][1]).name == "PreActBlock"  # no forward of its own
    model = torchvision.models.resnet.ResNet(_SEBlock, [1, 2, 2, 1])
    with pytest.raises(BlockError) as e:
        find_blocks(model)
    assert str(e.value).startswith("blocks='auto': layer1.0 (_SEBlock) derives from torchvision BasicBlock but has "
                                   "a forward of its own") and "register_block(_SEBlock, scaled_forward)" in str(e.value)
    assert [n for n, _ in find_blocks(model, ["layer3.1"])] == ["layer3.1"]
    with torch.no_grad():
        own = block(x)
        make_switchable(block)
        set_scale([block], 1.0 + 1e-12)  # through the scaled form: the gate is in it
        assert torch.allclose(block(x), own, atol=1e-6)
        set_scale([block], 0.25)
        assert torch.allclose(block(x), x + 0.25 * (own - x), atol=1e-6)  # the generic form: x + s(f(x)... )


class _FinalNormFirst(torch.nn.Module):
    """Residual blocks, then a BN: the BN registered first in __init__ (as a user's model may)."""

    def __init__(self, d=4):
        super().__init__()
        self.final = torch.nn.BatchNorm1d(d)
        self.first = torch.nn.BatchNorm1d(d)  # before the blocks: its input is every sub-network's
        self.inp, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, 2)
        self.blocks = torch.nn.ModuleList(_Step(d) for _ in range(4))

    def forward(self, x):
        x = self.first(self.inp(x))
        for b in self.blocks:
            x = b(x)
        return self.out(self.final(x))


def test_bn_after_the_blocks_is_recalibrated_whatever_order_the_model_registers_it_in():
    """ResIST re-estimates the BN layers from the first block on, which it took in registration
    order: a final BN registered before the blocks kept its sub-networks' statistics at evaluation
    (the docs say those are wrong there). The order is now the one the first forward runs."""
    from resist_mpi.comm.thread import run_ranks

    def body(c):
        torch.manual_seed(0)
        model = _FinalNormFirst()
        job = rm.ResIST(model, c, blocks=[f"blocks.{i}" for i in range(4)])
        before = [n for n, m in model.named_modules() if any(m is b for b in job.bn_to_recalibrate())]
        for _ in job.rounds(1):
            model(torch.randn(8, 4)).sum().backward()
        after = [n for n, m in model.named_modules() if any(m is b for b in job.bn_to_recalibrate())]
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
        return before, after, hooks
    for before, after, hooks in run_ranks(2, body):
        assert before == [] and after == ["final"] and hooks == 0  # (registration order before any forward)
    torch.manual_seed(0)
    model = _thin([1, 2, 2, 1])
    job = rm.ResIST(model, rm.init("self", fail_fast=False))
    registered = job.bn_to_recalibrate()
    for _ in job.rounds(1):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert [id(m) for m in job.bn_to_recalibrate()] == [id(m) for m in registered] and len(registered) > 1
