"""LLaMA-Adapter (Zhang et al. 2023): learned prompts that the top layers' queries attend to
through a zero-initialised gate.

Each adapted layer holds K prompt vectors P [K, D] (adaption_tokens) and a gate g [H]. Its own
k and v projections (and k_norm, with qk_norm) turn P into K extra keys and values per
KV head, which carry no position: no RoPE, no ALiBi bias, no mask. Every query q (after RoPE)
attends to them in a softmax of its own, apart from the tokens', and the result, scaled per
head by tanh(g), joins the heads' attention output before o_proj:
    y_h <- y_h + tanh(g_h) softmax(q_h K_P^T * scale) V_P
with the layer's softmax scale. g starts at zero, so an adapted model starts out computing
what its base does. P is drawn from a standard normal, as the authors' code and peft draw it.

Hugging Face peft's AdaptionPrompt differs in its gate: one scalar per layer, used as it is
rather than through tanh; ours with every head's g = artanh(peft's) computes the same (it
passes the prompts' output through o_proj apart, so the two differ by o_proj's bias if any).
The adapted layers are the top adaption_layers (0: all); the keys of P are not cached tokens,
so a KV cache holds only the tokens' keys, and cached decoding computes the full forward.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.config import check_adds
from lmlab.models.sharding import EMBED, HEADS


class AdaptionPromptParam(nnx.Param):
  """An adaption prompt or its gate: what a peft=llama_adapter run trains."""


class AdaptionPrompt(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(config.param_dtype)
    self.prompt = sharding.param(
        jax.random.normal(rngs.params(), (config.adaption_tokens, config.d_model), param_dtype),
        (None, EMBED), kind=AdaptionPromptParam)
    self.gate = sharding.param(jnp.zeros((config.n_heads,), param_dtype), (HEADS,),
                               kind=AdaptionPromptParam)
    self.scale = config.softmax_scale

  def __call__(self, q_bthd, keys_values):
    """The gated attention of q_bthd (after RoPE) to the prompt, [B, T, H, D];
    keys_values(x_btd) is the layer's (k_btkd, v_btkd) of x, before positions."""
    k_1zkd, v_1zkd = keys_values(self.prompt[...][None])
    b, t, h, d = q_bthd.shape
    kv = k_1zkd.shape[2]
    q_btkgd = q_bthd.reshape(b, t, kv, h // kv, d)
    scores_bkgtz = jnp.einsum('btkgd,zkd->bkgtz', q_btkgd, k_1zkd[0],
                              preferred_element_type=jnp.float32) * self.scale
    probs_bkgtz = jax.nn.softmax(scores_bkgtz, axis=-1).astype(q_bthd.dtype)
    out_btkgd = jnp.einsum('bkgtz,zkd->btkgd', probs_bkgtz, v_1zkd[0].astype(q_bthd.dtype))
    gate_kg = jnp.tanh(self.gate[...]).astype(q_bthd.dtype).reshape(kv, h // kv)
    return (out_btkgd * gate_kg[:, :, None]).reshape(b, t, h, d)


def adapted_layers(config) -> range:
  """The indices of the blocks that peft=llama_adapter adapts: the top adaption_layers."""
  return range(config.n_layers - (config.adaption_layers or config.n_layers), config.n_layers)


def add_llama_adapter(model, config, *, rngs: nnx.Rngs):
  """`model` with an AdaptionPrompt in the attention of each of the top adaption_layers blocks
  and `config` as its config; changed in place and returned. model is a decoder built from
  config (models/registry.build calls this) or from its base, without_peft(config)."""
  check_adds('llama_adapter', config, model.config, 'add_llama_adapter')
  for i in adapted_layers(config):
    # nnx.data: the attribute held None, which nnx takes for static.
    model.blocks[i].attention.adaption = nnx.data(AdaptionPrompt(config, rngs=rngs))
  model.config = config
  return model
