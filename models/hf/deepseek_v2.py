"""DeepSeek-V2 in transformers (DeepseekV2ForCausalLM).

A LLaMA-style pre-RMSNorm SwiGLU decoder whose attention is MLA (models/mla.py, whose
parameters carry transformers' names). Its RoPE rotates interleaved pairs, and under YaRN its
softmax scale takes the extra mscale_all_dim factor (models.mla.latent_softmax_scale).
Layers from first_k_dense_replace on are mixtures of experts (DeepSeekMoE): n_routed_experts
fine-grained experts, num_experts_per_tok of them weighted by their softmax probabilities
(not renormalised; times routed_scaling_factor, chosen within the topk_group best of n_group
groups under group_limited_greedy), beside n_shared_experts shared ones that every token
passes, which are one MLP n_shared_experts times as wide. Without n_routed_experts every
layer is dense, as in DeepSeek's own code.
"""
from lmlab.models.errors import CheckpointError
from lmlab.models.hf import experts
from lmlab.models.hf.architecture import (Architecture, copy, field, linear, refuse, rope_from_hf,
                                          rope_to_hf)
from lmlab.models.hf.llama import ends_links

FIXED = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
             rope_interleaved=True, parallel_block=False, attention_scale='inv_sqrt_d',
             attention_type='mla', head='dense', embed_norm=False, dca_chunk_size=0,
             dca_local_size=0, qk_norm=False, sliding_window=0, head_dim=0,
             moe_router='softmax_topk', moe_norm_topk=False, moe_shared_gate=False,
             moe_layer_freq=1)
TOPK_METHODS = ('greedy', 'group_limited_greedy')


def experts_from_hf(hf_config: dict) -> dict:
  """The mixture-of-experts fields; none when every layer is dense."""
  first_dense = field(hf_config, 'first_k_dense_replace', 0)
  if (hf_config.get('n_routed_experts') is None
      or first_dense >= field(hf_config, 'num_hidden_layers')):
    return {}
  refuse(hf_config, 'moe_layer_freq', (1,), 'transformers makes every layer from '
         'first_k_dense_replace on a mixture of experts')
  refuse(hf_config, 'scoring_func', ('softmax',), 'the router scores with a softmax')
  refuse(hf_config, 'topk_method', TOPK_METHODS, f'the routers are {", ".join(TOPK_METHODS)}')
  refuse(hf_config, 'norm_topk_prob', (False,), 'transformers\' DeepseekV2 does not '
         'renormalise the top-k weights, whatever this says')
  grouped = hf_config.get('topk_method') == 'group_limited_greedy'
  expert_width = field(hf_config, 'moe_intermediate_size')
  return dict(moe_experts=field(hf_config, 'n_routed_experts'),
              moe_top_k=field(hf_config, 'num_experts_per_tok'),
              moe_ffn_dim=experts.moe_ffn_dim_from_hf(hf_config, 'moe_intermediate_size'),
              moe_shared_ffn_dim=field(hf_config, 'n_shared_experts', 0) * expert_width,
              moe_routed_scale=field(hf_config, 'routed_scaling_factor', 1.0, expected=float),
              moe_groups=field(hf_config, 'n_group') if grouped else 0,
              moe_topk_groups=field(hf_config, 'topk_group') if grouped else 0,
              moe_first_dense=first_dense,
              moe_aux_loss_weight=field(hf_config, 'aux_loss_alpha', 0.001, expected=float))


def experts_to_hf(config) -> dict:
  if not config.moe_experts:
    return dict(first_k_dense_replace=config.n_layers)
  return dict(n_routed_experts=config.moe_experts, num_experts_per_tok=config.moe_top_k,
              moe_intermediate_size=config.expert_ffn_dim,
              n_shared_experts=config.moe_shared_ffn_dim // config.expert_ffn_dim,
              routed_scaling_factor=config.moe_routed_scale,
              topk_method='group_limited_greedy' if config.moe_groups else 'greedy',
              n_group=config.moe_groups or None, topk_group=config.moe_topk_groups or None,
              first_k_dense_replace=config.moe_first_dense, norm_topk_prob=False,
              scoring_func='softmax', aux_loss_alpha=config.moe_aux_loss_weight)


def from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'hidden_act', ('silu',), 'the MLP is SwiGLU (silu)')
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
              v_head_dim=field(hf_config, 'v_head_dim'), **rope_from_hf(hf_config),
              **experts_from_hf(hf_config))


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
              **experts_to_hf(config), **rope_to_hf(config))


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
    result += experts.mlp_links(config, i, experts.DEEPSEEK_V2)
    result += [copy(hf + 'input_layernorm.weight', ours + ('attn_in_norm', 'scale')),
               copy(hf + 'post_attention_layernorm.weight', ours + ('mlp_in_norm', 'scale'))]
  return result


DEEPSEEK_V2 = Architecture('DeepseekV2ForCausalLM', 'deepseek_v2', FIXED, from_hf, to_hf, links)
