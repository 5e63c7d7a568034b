"""Packed projections (fp8fx.api.pack_projections): quantize_ stores q/k/v and gate/up as row
ranges of one codes buffer and one scales buffer each; a compiled prefill runs each group as
one fp8fx.block_gemm_cat (passes/linear.py), and the CUDA op one GEMM over the packed rows
(kernels._joint_weight, whose bookkeeping runs on any device and is checked here)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fp8fx
from conftest import fresh_compile, heavy_tailed, make_tiny_llama
from fp8fx import BlockFP8Config, kernels
from fp8fx.api import pack_projections, packed_rows


def _llama(layers=2):
    return make_tiny_llama(layers).requires_grad_(False)


def _groups(model, layer=0):
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    return [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], [mlp.gate_proj.weight, mlp.up_proj.weight]


def _is_packed(weights):
    return packed_rows([w.qdata for w in weights]) and packed_rows([w.scale for w in weights])


@pytest.mark.parametrize("scale_fmt", ["float32", "ue8m0"])
def test_quantize_packs_without_changing_values(scale_fmt):
    model = _llama()
    plain = copy.deepcopy(model)
    config = BlockFP8Config(scale_fmt=scale_fmt)
    report = fp8fx.quantize_(model, config)
    fp8fx.quantize_(plain, config, pack=False)
    assert any("4 groups of projections" in n for n in report.notes), report.notes
    for packed_group, plain_group in zip(_groups(model), _groups(plain)):
        assert _is_packed(packed_group) and not _is_packed(plain_group)
        for w, p in zip(packed_group, plain_group):
            assert w.shape == p.shape and torch.equal(w.qdata.view(torch.uint8), p.qdata.view(torch.uint8))
            assert torch.equal(w.scale.float(), p.scale.float())
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert pack_projections(model) == []  # already packed
    assert pack_projections(plain) == [f"model.layers.{i}.{m}" for i in range(2) for m in
                                       ("self_attn.{q_proj,k_proj,v_proj}", "mlp.{gate_proj,up_proj}")]


def test_groups_not_quantized_alike_stay_apart():
    model = _llama()
    report = fp8fx.quantize_(model, BlockFP8Config(modules_to_not_convert=("model.layers.0.self_attn.k_proj",)))
    qkv, gate_up = _groups(model)
    assert not isinstance(qkv[1], fp8fx.BlockFP8Tensor) and not _is_packed([qkv[0], qkv[2]])
    assert _is_packed(gate_up) and _is_packed(_groups(model, 1)[0])
    assert any("3 groups" in n for n in report.notes), report.notes


def test_state_dict_copy_keeps_packing_and_checkpoint_round_trip(tmp_path):
    model, other = _llama(), _llama()
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_(0, 0.02)
    fp8fx.quantize_(model)
    fp8fx.quantize_(other)
    model.load_state_dict(other.state_dict())  # copy_ into the packed rows
    for group, src in zip(_groups(model), _groups(other)):
        assert _is_packed(group)
        assert all(torch.equal(w.qdata.view(torch.uint8), s.qdata.view(torch.uint8)) for w, s in zip(group, src))
    fp8fx.save_quantized(model, tmp_path)  # safetensors refuses tensors sharing a buffer: saved as copies
    fresh = _llama()
    report = fp8fx.load_quantized(fresh, tmp_path)
    assert len(report.packed) == 4 and all(_is_packed(g) for g in _groups(fresh))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    unpacked = _llama()
    assert not fp8fx.load_quantized(unpacked, tmp_path, pack=False).packed
    assert not _is_packed(_groups(unpacked)[0])


def test_prefill_graph_runs_packed_groups_as_one_op():
    model = _llama(layers=1)
    fp8fx.quantize_(model)
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 9))
    compiled = torch.compile(model, backend=fp8fx.backend, fullgraph=True, dynamic=True)
    with fresh_compile(), torch.no_grad():
        out = compiled(ids).logits
        assert counters["fp8fx"]["block_gemm_cat"] == 2 and counters["fp8fx"]["block_gemm_cat_members"] == 5
        assert torch.equal(out, eager(ids).logits)
        ids2 = torch.randint(0, 128, (1, 20))
        assert torch.equal(compiled(ids2).logits, eager(ids2).logits)


def test_unpacked_model_keeps_one_gemm_per_weight():
    model = _llama(layers=1)
    fp8fx.quantize_(model, pack=False)
    with fresh_compile(), torch.no_grad():
        torch.compile(model, backend=fp8fx.backend, dynamic=True)(torch.randint(0, 128, (1, 9)))
        assert not counters["fp8fx"]["block_gemm_cat"] and counters["fp8fx"]["block_gemm_lowered"] == 7


def test_compile_reports_groups_a_copy_unpacked():
    """model.to() to another device copies each weight on its own (here: Module._apply with a
    clone, what .to() does per tensor): the groups quantize_ packed are not packed any more.
    Compiling the copy says so (a warning and a note in the report) and names the fix;
    packing again silences it. A deepcopy keeps the packing (views of one storage stay views),
    and a model quantized with pack=False compiles without it."""
    import warnings

    from fp8fx.api import unpacked_groups
    from fp8fx.backend import last_report

    model = _llama(layers=2)
    fp8fx.quantize_(model)
    copied = copy.deepcopy(model)
    assert all(_is_packed(g) for g in _groups(copied)) and not unpacked_groups(list(copied.parameters()))
    copied._apply(lambda t: t.clone())
    qkv, gate_up = _groups(copied)
    assert not _is_packed(qkv) and not _is_packed(gate_up)
    assert qkv[0].pack_group[0] is qkv[2].pack_group[0] is not _groups(model)[0][0].pack_group[0]
    assert len(unpacked_groups(list(copied.parameters()))) == 4  # 2 layers x (q/k/v, gate/up)
    ids = torch.randint(0, 128, (1, 9))
    with fresh_compile(), torch.no_grad():
        with pytest.warns(UserWarning, match=r"4 group\(s\) of projections .* not packed any more .*pack_projections"):
            torch.compile(copied, backend=fp8fx.backend, dynamic=True)(ids)
        assert any("not packed any more" in n for n in last_report().notes)
    pack_projections(copied)
    unpacked = _llama(layers=1)
    fp8fx.quantize_(unpacked, pack=False)
    for m in (copied, model, unpacked):
        with fresh_compile(), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*not packed any more")
            torch.compile(m, backend=fp8fx.backend, dynamic=True)(ids)


def test_packing_enters_the_graph_cache_key():
    """Inductor's FX graph cache keys inputs without storage offsets: the pass's uuid carries
    which weights share a buffer (backend.packing_signature), so a graph compiled for packed
    weights is not served to unpacked ones (same shapes, same Dynamo graph)."""
    from fp8fx.backend import packing_signature
    from fp8fx.passes import PostGradPass

    packed, plain = _llama(layers=1), _llama(layers=1)
    fp8fx.quantize_(packed)
    fp8fx.quantize_(plain, pack=False)
    sig_packed = packing_signature(torch.fx.GraphModule(packed, torch.fx.Graph()), list(packed.parameters()))
    assert sig_packed.count("input") == 6 and packing_signature(torch.fx.GraphModule(plain, torch.fx.Graph()),
                                                                list(plain.parameters())) == ""
    assert PostGradPass(packing=sig_packed).uuid() != PostGradPass().uuid()
    from torch._inductor.utils import fresh_cache

    ids = torch.randint(0, 128, (1, 9))
    try:  # an empty cache, on
        with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
            for model, cat, lowered in ((packed, 2, 2), (plain, 2, 9)):
                torch._dynamo.reset()
                if model is packed:
                    counters.clear()
                torch.compile(model, backend=fp8fx.backend, dynamic=True)(ids)
                # a cache hit would skip the pass and the lowering: their counters would not move
                assert counters["fp8fx"]["block_gemm_cat"] == cat and counters["fp8fx"]["block_gemm_lowered"] == lowered
    finally:
        torch._dynamo.reset()


def test_joint_weight_views_and_cache():
    from fp8fx import reference

    q, s = reference.quantize_weight(heavy_tailed(640, 256, seed=3), (128, 128), "float32")
    ws, ss = [q[:384], q[384:512], q[512:]], [s[:3], s[3:4], s[4:]]
    kernels._JOINT.clear()
    joint = kernels._joint_weight(ws, ss)
    assert joint is not None and joint[0].data_ptr() == q.data_ptr() and joint[0].shape == (640, 256)
    assert torch.equal(joint[1], s)
    assert kernels._joint_weight(ws, ss)[0] is joint[0] and len(kernels._JOINT) == 1  # a hit: the same views
    assert kernels._joint_weight([ws[0], ws[2], ws[1]], [ss[0], ss[2], ss[1]]) is None  # out of order
    assert kernels._joint_weight([ws[0], ws[1].clone(), ws[2]], ss) is None  # one copy: not packed
    assert kernels._joint_weight(ws, [ss[0], ss[1].clone(), ss[2]]) is None
    assert not packed_rows([q[:128], q[256:384]])  # a gap
    # The entry holds the packed buffers, not the weights: once they go, so do the entry and
    # the buffers (a deleted model's weights are not kept alive by the cache).
    import gc
    import weakref

    buffers = [weakref.ref(q), weakref.ref(s)]
    del q, s, ws, ss, joint
    gc.collect()
    assert not kernels._JOINT and all(r() is None for r in buffers)
