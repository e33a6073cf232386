"""DeepSeek-V2 in transformers (DeepseekV2ForCausalLM), dense layers only.

A LLaMA-style pre-RMSNorm SwiGLU decoder whose attention is MLA (models/mla.py, whose
parameters carry transformers' names). Its RoPE rotates interleaved pairs, and under YaRN its
softmax scale takes the extra mscale_all_dim factor (models.mla.latent_softmax_scale).
Mixture-of-experts layers are not implemented: a checkpoint that has any is refused.
"""
from lmlab.models.errors import CheckpointError
from lmlab.models.hf.architecture import (Architecture, copy, field, linear, refuse, rope_from_hf,
                                          rope_to_hf)
from lmlab.models.hf.llama import ends_links

FIXED = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
             rope_interleaved=True, parallel_block=False, attention_scale='inv_sqrt_d',
             attention_type='mla', head='dense', embed_norm=False, dca_chunk_size=0,
             dca_local_size=0, qk_norm=False, sliding_window=0, head_dim=0)


def refuse_experts(hf_config: dict):
  """Layers from first_k_dense_replace on are mixture-of-experts when n_routed_experts is set."""
  n_layers = field(hf_config, 'num_hidden_layers')
  first_moe = field(hf_config, 'first_k_dense_replace', 0)
  if hf_config.get('n_routed_experts') is not None and first_moe < n_layers:
    raise CheckpointError(
        f'config.json first_k_dense_replace={first_moe} with n_routed_experts='
        f'{hf_config["n_routed_experts"]}: layers {first_moe}..{n_layers - 1} are '
        'mixture-of-experts, which is not supported; only all-dense DeepseekV2 models load '
        f'(first_k_dense_replace >= num_hidden_layers={n_layers}, or n_routed_experts null)')


def from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'hidden_act', ('silu',), 'the MLP is SwiGLU (silu)')
  refuse_experts(hf_config)
  n_heads = field(hf_config, 'num_attention_heads')
  refuse(hf_config, 'num_key_value_heads', (n_heads,),
         f'MLA expands its latent to every one of the num_attention_heads={n_heads} heads')
  attention_bias = field(hf_config, 'attention_bias', False, expected=bool)
  mlp_bias = field(hf_config, 'mlp_bias', False, expected=bool)
  if attention_bias != mlp_bias:
    raise CheckpointError(f'config.json attention_bias={attention_bias} with mlp_bias={mlp_bias} '
                          'is not supported: the output projection shares the MLP\'s biases')
  return dict(vocab_size=field(hf_config, 'vocab_size'), d_model=field(hf_config, 'hidden_size'),
              n_layers=field(hf_config, 'num_hidden_layers'), n_heads=n_heads, n_kv_heads=n_heads,
              ffn_dim=field(hf_config, 'intermediate_size'),
              max_seq_len=field(hf_config, 'max_position_embeddings'),
              norm_eps=field(hf_config, 'rms_norm_eps', expected=float),
              tie_embeddings=field(hf_config, 'tie_word_embeddings', False, expected=bool),
              qkv_bias=attention_bias, use_bias=mlp_bias,
              kv_lora_rank=field(hf_config, 'kv_lora_rank'),
              q_lora_rank=field(hf_config, 'q_lora_rank', 0),
              qk_rope_head_dim=field(hf_config, 'qk_rope_head_dim'),
              qk_nope_head_dim=field(hf_config, 'qk_nope_head_dim'),
              v_head_dim=field(hf_config, 'v_head_dim'), **rope_from_hf(hf_config))


def to_hf(config) -> dict:
  return dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_heads, intermediate_size=config.ffn_dim,
              max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
              hidden_act='silu', tie_word_embeddings=config.tie_embeddings,
              attention_bias=config.qkv_bias, mlp_bias=config.use_bias,
              kv_lora_rank=config.kv_lora_rank, q_lora_rank=config.q_lora_rank or None,
              qk_rope_head_dim=config.qk_rope_head_dim,
              qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim,
              first_k_dense_replace=config.n_layers, **rope_to_hf(config))


def links(config) -> list:
  result = ends_links(config)
  for i in range(config.n_layers):
    hf, ours = f'model.layers.{i}.', ('blocks', i)
    attention, hf_attention = ours + ('attention',), hf + 'self_attn.'
    if config.q_lora_rank:
      result += linear(hf_attention + 'q_a_proj', attention + ('q_a_proj',), bias=config.qkv_bias)
      result.append(copy(hf_attention + 'q_a_layernorm.weight',
                         attention + ('q_a_layernorm', 'scale')))
      result += linear(hf_attention + 'q_b_proj', attention + ('q_b_proj',), bias=False)
    else:
      result += linear(hf_attention + 'q_proj', attention + ('q_proj',), bias=False)
    result += linear(hf_attention + 'kv_a_proj_with_mqa', attention + ('kv_a_proj_with_mqa',),
                     bias=config.qkv_bias)
    result.append(copy(hf_attention + 'kv_a_layernorm.weight',
                       attention + ('kv_a_layernorm', 'scale')))
    result += linear(hf_attention + 'kv_b_proj', attention + ('kv_b_proj',), bias=False)
    result += linear(hf_attention + 'o_proj', attention + ('o_proj',), bias=config.use_bias)
    for hf_name, name in (('gate_proj', 'gate'), ('up_proj', 'up'), ('down_proj', 'down')):
      result += linear(hf + 'mlp.' + hf_name, ours + ('mlp', name), bias=config.use_bias)
    result += [copy(hf + 'input_layernorm.weight', ours + ('attn_in_norm', 'scale')),
               copy(hf + 'post_attention_layernorm.weight', ours + ('mlp_in_norm', 'scale'))]
  return result


DEEPSEEK_V2 = Architecture('DeepseekV2ForCausalLM', 'deepseek_v2', FIXED, from_hf, to_hf, links)
