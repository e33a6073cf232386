"""Cross-attention of the encoder-decoder (Vaswani et al. 2017): queries from the decoder,
keys and values from the encoder output.

The keys and values depend on the source only, so `memory` computes them once per source
and every decoding step reuses them. No position encoding enters; the only mask is the
source padding.
"""
import jax.numpy as jnp

from lmlab.models import sharding
from lmlab.models.attention import SelfAttention


class CrossAttention(SelfAttention):
  """SelfAttention's projections (q_proj, k_proj, v_proj, o_proj, optional q/k norms),
  applied across two sequences."""

  def memory(self, source_bsd, source_mask_bs):
    """{'k', 'v': [B, S, Hkv, D], 'mask': [B, S]} of the encoder output."""
    b, s, _ = source_bsd.shape
    k_bskd = self.k_proj(source_bsd).reshape(b, s, self.n_kv_heads, self.head_dim)
    v_bskd = self.v_proj(source_bsd).reshape(b, s, self.n_kv_heads, self.head_dim)
    if self.k_norm is not None:
      k_bskd = self.k_norm(k_bskd)
    return {'k': k_bskd, 'v': v_bskd, 'mask': jnp.asarray(source_mask_bs, jnp.int32)}

  def __call__(self, x_btd, memory):
    """Each target token attends to every real source token of its row."""
    b, t, _ = x_btd.shape
    q_bthd = self.q_proj(x_btd).reshape(b, t, self.n_heads, self.head_dim)
    if self.q_norm is not None:
      q_bthd = self.q_norm(q_bthd)
    # Source padding is segment 0 and every query segment 1, so padding is never seen.
    segments = (jnp.ones((b, t), jnp.int32), memory['mask'])
    y_bthd = sharding.attention(q_bthd, memory['k'], memory['v'], causal=False,
                               scale=self.scale, segment_ids=segments, impl=self.impl)
    return self.o_proj(y_bthd.reshape(b, t, self.n_heads * self.head_dim))
