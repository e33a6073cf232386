"""kernels/grouped_matmul.py against each row times its group's matrix, written plainly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.kernels import grouped_matmul


def reference(x_Ad, w_Gdf, group_A):
  return jnp.einsum('ad,adf->af', x_Ad, w_Gdf[group_A])


@pytest.mark.parametrize('implementation', grouped_matmul.IMPLEMENTATIONS)
def test_values_and_gradients_match_the_plain_product(implementation, rng):
  """Groups of random sizes, some empty and some of several blocks."""
  g, d, f = int(rng.integers(2, 7)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
  sizes = rng.integers(0, 40, g) * (rng.random(g) < 0.7)
  sizes[int(rng.integers(g))] += 1
  group_A = jnp.asarray(np.repeat(np.arange(g), sizes), jnp.int32)
  x_Ad = jnp.asarray(rng.normal(size=(int(sizes.sum()), d)), jnp.float32)
  w_Gdf = jnp.asarray(rng.normal(size=(g, d, f)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(x_Ad.shape[0], f)), jnp.float32)

  def ours(x, w):
    grouping = grouped_matmul.Grouping(group_A, g, implementation)
    return grouping.unpack(grouping.matmul(grouping.pack(x), w))

  for fn in (ours, lambda x, w: reference(x, w, group_A)):
    assert fn(x_Ad, w_Gdf).shape == (x_Ad.shape[0], f)
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(x_Ad, w_Gdf)),
                             np.asarray(reference(x_Ad, w_Gdf, group_A)), rtol=1e-5, atol=1e-5)
  grads = lambda fn: jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * cotangent),
                                      argnums=(0, 1)))(x_Ad, w_Gdf)
  for got, expected in zip(grads(ours), grads(lambda x, w: reference(x, w, group_A))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_blocks_are_the_power_of_two_below_a_groups_mean_size_within_bounds():
  assert grouped_matmul.block_rows(4096, 8) == 128
  assert grouped_matmul.block_rows(4096, 64) == 64
  assert grouped_matmul.block_rows(3000, 64) == 32
  assert grouped_matmul.block_rows(10, 64) == grouped_matmul.SMALLEST_BLOCK
