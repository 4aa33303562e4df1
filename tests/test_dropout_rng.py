"""The fused kernels' dropout seeds on the device (kernels.dropout_rng)."""

import torch

from blip2rt.kernels import dropout_rng


def test_the_draw_kernel_gives_the_seeds_of_the_torch_ops_and_advances_the_count():
    """On a GPU the draw is one Triton kernel; here it runs in the interpreter against the torch ops
    the CPU draws with, from the same states, including a count whose product with the stride would
    pass int64 unreduced."""
    for base, count in ((12345, 0), (2**31 - 2, 7), (5, 3 * 2**32 + 11)):
        by_kernel = torch.tensor([base, count], dtype=torch.int64)
        dropout_rng.load_state_dict({"cpu": by_kernel.clone()})
        seeds_ops = [int(dropout_rng.draw("cpu")) for _ in range(3)]
        seeds_kernel = [int(dropout_rng.draw_in_kernel(by_kernel)) for _ in range(3)]
        assert seeds_kernel == seeds_ops
        assert by_kernel.tolist() == dropout_rng.state("cpu").tolist() == [base, count + 3]
        assert all(0 <= x < 2**31 - 1 for x in seeds_kernel)
        # the Weyl step: consecutive seeds differ by the stride, mod 2^31 - 1
        assert (seeds_ops[1] - seeds_ops[0]) % (2**31 - 1) == 1327217885
    dropout_rng.reset()


def test_draw_on_the_cpu_equals_the_kernel_draw():
    dropout_rng.reset()
    torch.manual_seed(3)
    state = dropout_rng.state("cpu").clone()
    drawn = [int(dropout_rng.draw("cpu")) for _ in range(4)]
    in_kernel = [int(dropout_rng.draw_in_kernel(state)) for _ in range(4)]
    assert drawn == in_kernel
    assert len(set(drawn)) == 4
    dropout_rng.reset()


def test_a_saved_state_draws_the_same_seeds_again():
    dropout_rng.reset()
    torch.manual_seed(11)
    dropout_rng.draw("cpu")
    saved = dropout_rng.state_dict()
    after = [int(dropout_rng.draw("cpu")) for _ in range(3)]
    dropout_rng.load_state_dict(saved)
    assert [int(dropout_rng.draw("cpu")) for _ in range(3)] == after
    dropout_rng.reset()
