"""Grouped matrix products: rows sorted by group, each group times its own matrix.

A mixture of experts' dropless compute (models/moe.py) sorts its token-expert assignments by
expert and multiplies each expert's rows by that expert's weights. Two ways:
  ragged_dot  jax.lax.ragged_dot on the sorted rows, which XLA lowers natively on TPU
              (and GPU); on a CPU it runs slower than multiplying every row by every matrix.
  blocks      each group's rows padded to whole blocks of `block` rows, so that every block
              belongs to one group, and each block in use multiplied by its group's matrix
              in a loop (the layout has room for G blocks more than the rows fill; the
              empty ones at its end are skipped). The backward pass is written by hand:
              the same loop for the rows' gradients, and each block's product added into
              its group's gradient in place, so no matrix is copied per block. This is
              MegaBlocks' layout (Gale et al. 2022) without its kernels; on a CPU it is
              several times as fast as ragged_dot (benchmarks/moe.py).
'auto' takes blocks on a CPU and ragged_dot elsewhere.

A `Grouping` is made once for a set of rows and serves several products (an expert's gate,
up and down projections): pack the rows into its layout, multiply, unpack.
Axes (docs/AXES.md): A rows (sorted by group), G groups, R rows of the layout, M its blocks,
W the rows of a block, d and f features.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('ragged_dot', 'blocks')
# Rows per block: a group's mean size (padding at most doubles the rows; smaller blocks
# make more, smaller products in the loop), a power of two within these bounds.
SMALLEST_BLOCK, LARGEST_BLOCK = 8, 128


def resolve(implementation: str) -> str:
  if implementation == 'auto':
    return 'blocks' if jax.default_backend() == 'cpu' else 'ragged_dot'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'grouped matmul implementation {implementation!r} is not one of auto, '
                     f'{", ".join(IMPLEMENTATIONS)}')
  return implementation


def block_rows(n_rows: int, n_groups: int) -> int:
  mean = max(1, n_rows // n_groups)
  return min(LARGEST_BLOCK, max(SMALLEST_BLOCK, 1 << (mean.bit_length() - 1)))


@dataclasses.dataclass(frozen=True)
class Grouping:
  """The layout of rows whose groups are group_A (ascending), for `implementation`."""
  group_A: jax.Array
  n_groups: int
  implementation: str = 'auto'

  def __post_init__(self):
    object.__setattr__(self, 'implementation', resolve(self.implementation))

  @functools.cached_property
  def sizes_G(self):
    return jnp.bincount(self.group_A, length=self.n_groups).astype(jnp.int32)

  @property
  def block(self) -> int:
    return block_rows(self.group_A.shape[0], self.n_groups)

  @property
  def n_blocks(self) -> int:
    """Blocks enough for any grouping: each group leaves fewer than one block part empty."""
    return -(-self.group_A.shape[0] // self.block) + self.n_groups

  @functools.cached_property
  def _padded_ends_G(self):
    """Where each group's rows end in the blocks layout, padded to whole blocks."""
    return jnp.cumsum(-(-self.sizes_G // self.block) * self.block)

  @functools.cached_property
  def _row_A(self):
    """Each row's place in the blocks layout: its group's padded start plus its rank."""
    padded_starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), self._padded_ends_G[:-1]])
    starts_G = jnp.cumsum(self.sizes_G) - self.sizes_G
    return (padded_starts_G[self.group_A] + jnp.arange(self.group_A.shape[0])
            - starts_G[self.group_A])

  @functools.cached_property
  def _group_M(self):
    """The group of each block of the layout (the last group's for blocks past the rows)."""
    starts_M = jnp.arange(self.n_blocks) * self.block
    return jnp.minimum(jnp.searchsorted(self._padded_ends_G, starts_M, side='right'),
                       self.n_groups - 1)

  def pack(self, x_Ad):
    if self.implementation == 'ragged_dot':
      return x_Ad
    layout = jnp.zeros((self.n_blocks * self.block, x_Ad.shape[1]), x_Ad.dtype)
    return layout.at[self._row_A].set(x_Ad, unique_indices=True)

  def unpack(self, y_Rf):
    if self.implementation == 'ragged_dot':
      return y_Rf
    return y_Rf[self._row_A]

  def matmul(self, x_Rd, w_Gdf):
    """Rows of the layout times their group's matrix of w_Gdf [G, D, F]."""
    if self.implementation == 'ragged_dot':
      return jax.lax.ragged_dot(x_Rd, w_Gdf, self.sizes_G)
    x_MWd = x_Rd.reshape(self.n_blocks, self.block, -1)
    used = self._padded_ends_G[-1] // self.block
    return _block_products(x_MWd, w_Gdf, self._group_M, used).reshape(-1, w_Gdf.shape[-1])


def _each_used_block(blocks_MWx, group_M, used, product, width: int):
  """product(block, its group) [W, width] of each of the first `used` blocks; zeros after."""
  def one(args):
    block_Wx, group, index = args
    return jax.lax.cond(index < used, lambda: product(block_Wx, group),
                        lambda: jnp.zeros((block_Wx.shape[0], width), block_Wx.dtype))
  return jax.lax.map(one, (blocks_MWx, group_M, jnp.arange(blocks_MWx.shape[0])))


@jax.custom_vjp
def _block_products(x_MWd, w_Gdf, group_M, used):
  """Each used block of rows times its group's matrix: [M, W, F]."""
  return _each_used_block(x_MWd, group_M, used, lambda x_Wd, g: x_Wd @ w_Gdf[g],
                          w_Gdf.shape[2])


def _block_products_forward(x_MWd, w_Gdf, group_M, used):
  return _block_products(x_MWd, w_Gdf, group_M, used), (x_MWd, w_Gdf, group_M, used)


def _block_products_backward(saved, dy_MWf):
  x_MWd, w_Gdf, group_M, used = saved
  dx_MWd = _each_used_block(dy_MWf, group_M, used, lambda dy_Wf, g: dy_Wf @ w_Gdf[g].T,
                            w_Gdf.shape[1])

  def add_block(dw_Gdf, args):
    x_Wd, dy_Wf, group, index = args
    return jax.lax.cond(index < used, lambda: dw_Gdf.at[group].add(x_Wd.T @ dy_Wf),
                        lambda: dw_Gdf), None

  dw_Gdf, _ = jax.lax.scan(add_block, jnp.zeros_like(w_Gdf),
                           (x_MWd, dy_MWf, group_M, jnp.arange(x_MWd.shape[0])))
  return dx_MWd, dw_Gdf, None, None


_block_products.defvjp(_block_products_forward, _block_products_backward)
