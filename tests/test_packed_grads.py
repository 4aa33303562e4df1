"""kernels.split_packed: the views of one packed projection, whose grads gather in one packed tensor. The
fused attention's backward writes its dq, dk and dv there in place (no copy behind the split); any other
grad is copied into its slice, a part without one gets zeros; the grads equal unbind's."""

import gc

import pytest
import torch

import blip2rt
from blip2rt import kernels
from blip2rt.kernels import packed_grads


@pytest.fixture(autouse=True)
def counts():
    for k in packed_grads.COUNTS:
        packed_grads.COUNTS[k] = 0
    yield packed_grads.COUNTS


def packed_kv(b=2, n=13, layers=3, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, layers * 2, h, d, generator=g).requires_grad_()


def test_fused_backward_writes_into_the_packed_grad_and_equals_unbind(counts):
    packed = packed_kv()
    q = torch.randn(2, 8, 2, 16, requires_grad=True)
    weights = torch.randn(3, 2, 8, 2, 16)

    def loss(parts, backend):
        return sum((kernels.qformer_cross_attention(q, parts[2 * i], parts[2 * i + 1], backend=backend) * weights[i]).sum()
                   for i in range(3))

    got = torch.autograd.grad(loss(kernels.split_packed(packed), "triton"), (packed, q))
    assert counts == {"in_place": 6, "copied": 0, "zeroed": 0}
    want = torch.autograd.grad(loss(packed.unbind(2), "torch"), (packed, q))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    assert packed_grads._PARTS == {}  # the graph is gone, and its parts with it


def test_other_grads_are_copied_and_unused_parts_get_zeros(counts):
    packed = packed_kv()
    q = torch.randn(2, 8, 2, 16, requires_grad=True)
    parts = kernels.split_packed(packed)
    out = kernels.qformer_cross_attention(q, parts[0], parts[1], backend="triton")  # layer 0: fused, in place
    out = out.sum() + kernels.qformer_cross_attention(q, parts[2], parts[3], backend="torch").pow(2).sum()  # copied
    out = out + parts[1].mean()  # a second use of v0: autograd sums the two grads
    (grad,) = torch.autograd.grad(out, packed)
    assert counts["zeroed"] == 2 and counts["in_place"] + counts["copied"] == 4 and counts["copied"] >= 2
    assert torch.equal(grad[:, :, 4:], torch.zeros_like(grad[:, :, 4:]))  # layer 2 unused
    ref_parts = packed.unbind(2)
    ref = kernels.qformer_cross_attention(q, ref_parts[0], ref_parts[1], backend="torch").sum()
    ref = ref + kernels.qformer_cross_attention(q, ref_parts[2], ref_parts[3], backend="torch").pow(2).sum()
    ref = ref + ref_parts[1].mean()
    (want,) = torch.autograd.grad(ref, packed)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def test_each_backward_gets_its_own_tensor_and_a_dropped_graph_forgets_its_parts(counts):
    """The parts' registry entries go with the node's first backward: a second one (retain_graph) writes new
    tensors, which are copied, into a new packed grad; a graph dropped without a backward forgets them too."""
    packed = packed_kv()
    q = torch.randn(2, 8, 2, 16)
    parts = kernels.split_packed(packed)
    out = kernels.qformer_cross_attention(q, parts[0], parts[1], backend="triton").sum()
    first = torch.autograd.grad(out, packed, retain_graph=True)[0]
    assert packed_grads._PARTS == {} and counts["in_place"] == 2
    second = torch.autograd.grad(out, packed)[0]
    assert counts["copied"] == 2 and first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    parts = kernels.split_packed(packed)  # a forward whose graph is dropped without a backward
    assert len(packed_grads._PARTS) == 6
    del parts
    gc.collect()
    assert packed_grads._PARTS == {}


def test_without_grad_it_is_unbind():
    packed = packed_kv().detach()
    parts = kernels.split_packed(packed)
    assert all(p.grad_fn is None for p in parts) and packed_grads._PARTS == {}
    with torch.no_grad():
        assert kernels.split_packed(packed_kv())[0].grad_fn is None


def test_a_qformer_training_step_copies_no_attention_grad(counts):
    """The whole Q-Former forward+backward on the fused path: every self-attention's q, k, v and every
    cross-attention's image k, v grads are written where the packed grads want them."""
    m = blip2rt.from_pretrained("tiny", device="cpu", kernels="triton").train()
    image = torch.randn(2, 17, m.config.vision_config.hidden_size)
    kv = m.qformer.image_kv(image)
    out, _ = m.qformer(m.query_tokens.expand(2, -1, -1), num_queries=m.config.num_query_tokens, text_mask=None,
                       mode=kernels.AttentionMode.BIDIRECTIONAL, image_kv=kv)
    out.float().pow(2).mean().backward()
    layers = m.config.qformer_config.num_hidden_layers
    cross = len(m.qformer.cross_layers())
    assert counts == {"in_place": 3 * layers + 2 * cross, "copied": 0, "zeroed": 0}
