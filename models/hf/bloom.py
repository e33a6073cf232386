"""BLOOM in transformers: ALiBi, a LayerNorm after the embeddings, a fused QKV matrix,
tanh-GELU MLPs of width 4d, biases everywhere, tied output embeddings."""
import numpy as np

from lmlab.models.hf.architecture import Architecture, Link, copy, field, linear, refuse

FIXED = dict(norm='layernorm', norm_placement='pre', mlp='gelu_tanh', position='alibi',
             use_bias=True, qkv_bias=True, tie_embeddings=True, qk_norm=False,
             parallel_block=False, attention_scale='inv_sqrt_d', attention_type='mha', head='dense',
             embed_norm=True, sliding_window=0, head_dim=0)
DEFAULT_LENGTH = 2048  # ALiBi has no position table; this only bounds generation by default.


def from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'apply_residual_connection_post_layernorm', (False,),
         'the residual stream must skip the layer norms')
  d_model = field(hf_config, 'hidden_size')
  n_heads = field(hf_config, 'n_head', None) or field(hf_config, 'num_attention_heads')
  return dict(vocab_size=field(hf_config, 'vocab_size'), d_model=d_model,
              n_layers=field(hf_config, 'n_layer', None) or field(hf_config, 'num_hidden_layers'),
              n_heads=n_heads, n_kv_heads=n_heads, ffn_dim=4 * d_model,
              norm_eps=field(hf_config, 'layer_norm_epsilon', 1e-5, expected=float),
              max_seq_len=field(hf_config, 'seq_length', DEFAULT_LENGTH))


def to_hf(config) -> dict:
  return dict(vocab_size=config.vocab_size, hidden_size=config.d_model, n_layer=config.n_layers,
              n_head=config.n_heads, layer_norm_epsilon=config.norm_eps,
              seq_length=config.max_seq_len, apply_residual_connection_post_layernorm=False)


def fused_qkv(hf_prefix: str, our_path: tuple, n_heads: int) -> list:
  """BLOOM stores q, k and v as one matrix whose output rows run head by head, each head
  holding its q, k and v rows in turn: rows [H, 3, D]."""
  names = ('q_proj', 'k_proj', 'v_proj')

  def split_weight(arrays):
    w_hx = np.asarray(arrays[0]).reshape(n_heads, 3, -1, arrays[0].shape[-1])
    return [w_hx[:, i].reshape(-1, w_hx.shape[-1]).T for i in range(3)]

  def join_weight(arrays):
    stacked = np.stack([a.T.reshape(n_heads, -1, a.shape[0]) for a in arrays], axis=1)
    return [stacked.reshape(-1, stacked.shape[-1])]

  def split_bias(arrays):
    b_hx = np.asarray(arrays[0]).reshape(n_heads, 3, -1)
    return [b_hx[:, i].reshape(-1) for i in range(3)]

  def join_bias(arrays):
    return [np.stack([a.reshape(n_heads, -1) for a in arrays], axis=1).reshape(-1)]

  return [Link((f'{hf_prefix}.weight',), tuple(our_path + (n, 'kernel') for n in names),
               split_weight, join_weight),
          Link((f'{hf_prefix}.bias',), tuple(our_path + (n, 'bias') for n in names),
               split_bias, join_bias)]


def layer_norm(hf_prefix: str, our_path: tuple) -> list:
  return [copy(f'{hf_prefix}.weight', our_path + ('scale',)),
          copy(f'{hf_prefix}.bias', our_path + ('bias',))]


def links(config) -> list:
  result = [copy('transformer.word_embeddings.weight', ('embed', 'embedding')),
            *layer_norm('transformer.word_embeddings_layernorm', ('embed_norm',)),
            *layer_norm('transformer.ln_f', ('final_norm',))]
  for i in range(config.n_layers):
    hf, ours = f'transformer.h.{i}.', ('blocks', i)
    result += layer_norm(hf + 'input_layernorm', ours + ('attn_in_norm',))
    result += fused_qkv(hf + 'self_attention.query_key_value', ours + ('attention',),
                        config.n_heads)
    result += linear(hf + 'self_attention.dense', ours + ('attention', 'o_proj'), bias=True)
    result += layer_norm(hf + 'post_attention_layernorm', ours + ('mlp_in_norm',))
    result += linear(hf + 'mlp.dense_h_to_4h', ours + ('mlp', 'up'), bias=True)
    result += linear(hf + 'mlp.dense_4h_to_h', ours + ('mlp', 'down'), bias=True)
  return result


BLOOM = Architecture('BloomForCausalLM', 'bloom', FIXED, from_hf, to_hf, links)
