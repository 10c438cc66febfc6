"""The encoder layer's register-tiled GEMM (csrc/small_gemm_avx2.h via small_gemm_cpu.h) against
torch.mm in float64: every tile size and edge (M % 6 in 0..5, N % 16 and N % 8 tails through masked
loads and stores), A either way round, the bias epilogue and accumulation; and which layer shapes
run their products through it."""
import pytest
import torch

from xlmr_mp.kernels import dispatch

pytestmark = pytest.mark.skipif(dispatch._cpu_extension() is None,
                                reason="xlmr_mp._C without the CPU kernels, or a CPU without AVX2/FMA")


def _ext():
    return dispatch._cpu_extension()


# (M, N, K): the tiny preset's per-part products, then every row and column remainder
SHAPES = [(256, 192, 64), (64, 128, 256), (13, 37, 5), (6, 16, 1), (7, 24, 9), (11, 3, 17), (1, 1, 1), (5, 130, 33),
          (4, 8, 0)]


@pytest.mark.parametrize("ta", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "acc"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_equals_torch_mm(shape, ta, accumulate, bias):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(K, M, generator=g) if ta else torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    c0 = torch.randn(M, N, generator=g)
    bv = torch.randn(N, generator=g) if bias else None
    # padded row strides: the kernel must honour lda / ldb / ldc, and write nothing past N
    lda, ldb, ldc = a.shape[1] + 3, N + 5, N + 7
    A = torch.zeros(a.shape[0], lda); A[:, :a.shape[1]] = a
    B = torch.zeros(K, ldb); B[:, :N] = b
    C = torch.full((M, ldc), 7.0); C[:, :N] = c0
    _ext().small_gemm(ta, M, N, K, A.data_ptr(), lda, B.data_ptr(), ldb, accumulate, C.data_ptr(), ldc,
                      bv.data_ptr() if bias else 0)
    op_a = a.double().t() if ta else a.double()
    want = op_a @ b.double() + (bv.double() if bias else 0.0) + (c0.double() if accumulate else 0.0)
    torch.testing.assert_close(C[:, :N].double(), want, rtol=1e-5, atol=1e-4 * max(1, K) ** 0.5)
    assert torch.all(C[:, N:] == 7.0), "wrote past the N columns of C"


def test_which_layer_shapes_take_it():
    ext = _ext()
    tiny = (8, 64, 64, 4, 128)                  # micro 8 of the tiny preset: two parts of 256 rows
    assert ext.encoder_small_products(tiny, 4, 2, False) and ext.encoder_small_products(tiny, 4, 2, True)
    assert ext.encoder_small_products(tiny, 4, 1, False)            # one thread: one single-threaded pass
    assert not ext.encoder_small_products((8, 64, 96, 4, 192), 4, 2, False)    # hidden 96: the BLAS
    assert not ext.encoder_small_products((8, 64, 64, 4, 512), 4, 2, False)    # ffn 512: the BLAS
    assert not ext.encoder_small_products((1, 64, 64, 4, 128), 4, 2, False)    # one batch row: threaded BLAS
