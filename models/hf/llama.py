"""The LLaMA family in transformers: Llama, Qwen2, Qwen3 and Mistral, and the mixtures of
experts built on them: Mixtral (Mistral's), Qwen2-MoE and Qwen3-MoE.

All are pre-RMSNorm decoders with SwiGLU MLPs and rotate-half RoPE; they differ in biases
(Qwen2: q/k/v only), QK-norm (Qwen3), and a sliding window (Mistral). The four dense ones
come as a causal LM (*ForCausalLM) and as a sequence classifier (*ForSequenceClassification:
a score head [num_labels, hidden] in place of the LM head; a reward model has one label).
Mixtral routes with a softmax over the top-k logits; Qwen's MoE take the top-k softmax
probabilities (renormalised when norm_topk_prob), and Qwen2-MoE adds a shared expert behind a
sigmoid gate (models/moe.py).
"""
import functools

import dataclasses

from lmlab.models.hf import experts
from lmlab.models.errors import CheckpointError
from lmlab.models.hf.architecture import (Architecture, copy, field, linear, refuse, rope_from_hf,
                                          rope_to_hf, typed)

LLAMA_FIXED = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
                   rope_interleaved=False, parallel_block=False, attention_scale='inv_sqrt_d',
                   attention_type='mha', head='dense', embed_norm=False, qk_norm=False,
                   sliding_window=0, n_labels=0)


def common_from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'hidden_act', ('silu',), 'the MLP is SwiGLU (silu)')
  d_model, n_heads = field(hf_config, 'hidden_size'), field(hf_config, 'num_attention_heads')
  # max(): a count of 0 reaches ModelConfig.validate, which names it, not a division.
  head_dim = field(hf_config, 'head_dim', d_model // max(n_heads, 1))
  return dict(vocab_size=field(hf_config, 'vocab_size'), d_model=d_model,
              n_layers=field(hf_config, 'num_hidden_layers'), n_heads=n_heads,
              n_kv_heads=field(hf_config, 'num_key_value_heads', n_heads),
              head_dim=0 if head_dim * n_heads == d_model else head_dim,
              ffn_dim=field(hf_config, 'intermediate_size'),
              max_seq_len=field(hf_config, 'max_position_embeddings'),
              norm_eps=field(hf_config, 'rms_norm_eps', expected=float),
              tie_embeddings=field(hf_config, 'tie_word_embeddings', False, expected=bool),
              **rope_from_hf(hf_config))


def common_to_hf(config) -> dict:
  return dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_kv_heads, head_dim=config.resolved_head_dim,
              intermediate_size=config.ffn_dim, max_position_embeddings=config.max_seq_len,
              rms_norm_eps=config.norm_eps, hidden_act='silu',
              tie_word_embeddings=config.tie_embeddings, **rope_to_hf(config))


def llama_from_hf(hf_config: dict) -> dict:
  attention_bias = field(hf_config, 'attention_bias', False, expected=bool)
  mlp_bias = field(hf_config, 'mlp_bias', False, expected=bool)
  if attention_bias != mlp_bias:
    raise CheckpointError(f'config.json attention_bias={attention_bias} with mlp_bias={mlp_bias} '
                          'is not supported: the output projection shares the MLP\'s biases')
  return dict(common_from_hf(hf_config), qkv_bias=attention_bias, use_bias=mlp_bias)


def llama_to_hf(config) -> dict:
  return dict(common_to_hf(config), attention_bias=config.qkv_bias, mlp_bias=config.use_bias)


def qwen_from_hf(hf_config: dict) -> dict:
  """Qwen's long-context checkpoints ask for Dual Chunk Attention at inference."""
  refuse(hf_config, 'use_sliding_window', (False,), 'Qwen layers with a sliding window')
  dca = field(hf_config, 'dual_chunk_attention_config', {}, expected=dict)
  return dict(common_from_hf(hf_config),
              **{ours: typed(f'dual_chunk_attention_config.{name}', dca.get(name, 0), int)
                 for ours, name in (('dca_chunk_size', 'chunk_size'),
                                    ('dca_local_size', 'local_size'))})


def qwen2_to_hf(config) -> dict:
  fields = dict(common_to_hf(config), use_sliding_window=False)
  if config.dca_chunk_size:
    fields['dual_chunk_attention_config'] = {'chunk_size': config.dca_chunk_size,
                                             'local_size': config.dca_local_size}
  return fields


def qwen3_from_hf(hf_config: dict) -> dict:
  attention_bias = field(hf_config, 'attention_bias', False, expected=bool)
  return dict(qwen_from_hf(hf_config), qkv_bias=attention_bias, use_bias=attention_bias)


def qwen3_to_hf(config) -> dict:
  return dict(qwen2_to_hf(config), attention_bias=config.qkv_bias)


def mistral_from_hf(hf_config: dict) -> dict:
  return dict(common_from_hf(hf_config), sliding_window=field(hf_config, 'sliding_window', 0))


def mistral_to_hf(config) -> dict:
  return dict(common_to_hf(config), sliding_window=config.sliding_window or None)


def ends_links(config) -> list:
  """The embedding, final norm and head (the untied LM head, or the score head) of a
  LLaMA-layout checkpoint."""
  links = [copy('model.embed_tokens.weight', ('embed', 'embedding')),
           copy('model.norm.weight', ('final_norm', 'scale'))]
  if config.n_labels:
    links += linear('score', ('score',), bias=False)
  elif not config.tie_embeddings:
    links += linear('lm_head', ('lm_head',), bias=False)
  return links


def llama_links(config, layout: experts.ExpertLayout | None = None) -> list:
  """layout: where a mixture of experts keeps its tensors (None: every MLP is dense)."""
  links = ends_links(config)
  for i in range(config.n_layers):
    hf, ours = f'model.layers.{i}.', ('blocks', i)
    for name in ('q_proj', 'k_proj', 'v_proj'):
      links += linear(hf + 'self_attn.' + name, ours + ('attention', name), bias=config.qkv_bias)
    links += linear(hf + 'self_attn.o_proj', ours + ('attention', 'o_proj'), bias=config.use_bias)
    links += experts.mlp_links(config, i, layout)
    links += [copy(hf + 'input_layernorm.weight', ours + ('attn_in_norm', 'scale')),
              copy(hf + 'post_attention_layernorm.weight', ours + ('mlp_in_norm', 'scale'))]
    if config.qk_norm:
      links += [copy(hf + 'self_attn.q_norm.weight', ours + ('attention', 'q_norm', 'scale')),
                copy(hf + 'self_attn.k_norm.weight', ours + ('attention', 'k_norm', 'scale'))]
  return links


def _without(fixed: dict, *names) -> dict:
  return {k: v for k, v in fixed.items() if k not in names}


LLAMA = Architecture('LlamaForCausalLM', 'llama', LLAMA_FIXED, llama_from_hf, llama_to_hf,
                     llama_links)
QWEN2 = Architecture('Qwen2ForCausalLM', 'qwen2', dict(LLAMA_FIXED, qkv_bias=True, use_bias=False),
                     qwen_from_hf, qwen2_to_hf, llama_links)
QWEN3 = Architecture('Qwen3ForCausalLM', 'qwen3', dict(LLAMA_FIXED, qk_norm=True), qwen3_from_hf,
                     qwen3_to_hf, llama_links)
MISTRAL = Architecture('MistralForCausalLM', 'mistral',
                       dict(_without(LLAMA_FIXED, 'sliding_window'), qkv_bias=False,
                            use_bias=False),
                       mistral_from_hf, mistral_to_hf, llama_links)


def mixtral_from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'router_jitter_noise', (0, 0.0), 'the router\'s input is not jittered')
  return dict(mistral_from_hf(hf_config), moe_experts=field(hf_config, 'num_local_experts'),
              moe_top_k=field(hf_config, 'num_experts_per_tok'),
              moe_aux_loss_weight=field(hf_config, 'router_aux_loss_coef', 0.001,
                                        expected=float))


def mixtral_to_hf(config) -> dict:
  return dict(mistral_to_hf(config), num_local_experts=config.moe_experts,
              num_experts_per_tok=config.moe_top_k, router_jitter_noise=0.0,
              router_aux_loss_coef=config.moe_aux_loss_weight)


def qwen2_moe_from_hf(hf_config: dict) -> dict:
  return dict(qwen_from_hf(hf_config), qkv_bias=field(hf_config, 'qkv_bias', True, expected=bool),
              **experts.qwen_moe_from_hf(hf_config, shared=True))


def qwen2_moe_to_hf(config) -> dict:
  return dict(qwen2_to_hf(config), qkv_bias=config.qkv_bias,
              **experts.qwen_moe_to_hf(config, shared=True))


def qwen3_moe_from_hf(hf_config: dict) -> dict:
  return dict(qwen3_from_hf(hf_config), **experts.qwen_moe_from_hf(hf_config, shared=False))


def qwen3_moe_to_hf(config) -> dict:
  return dict(qwen3_to_hf(config), **experts.qwen_moe_to_hf(config, shared=False))


# Fields every mixture of experts here has; the rest come from config.json.
MOE_FIXED = dict(moe_router='softmax_topk', moe_routed_scale=1.0, moe_groups=0,
                 moe_topk_groups=0)
MIXTRAL = Architecture('MixtralForCausalLM', 'mixtral',
                       dict(MISTRAL.fixed, **dict(MOE_FIXED, moe_router='topk_softmax'),
                            moe_norm_topk=False, moe_ffn_dim=0, moe_shared_ffn_dim=0,
                            moe_shared_gate=False, moe_first_dense=0, moe_layer_freq=1),
                       mixtral_from_hf, mixtral_to_hf,
                       functools.partial(llama_links, layout=experts.MIXTRAL))
QWEN2_MOE = Architecture('Qwen2MoeForCausalLM', 'qwen2_moe',
                         dict(_without(QWEN2.fixed, 'qkv_bias'), **MOE_FIXED,
                              moe_shared_gate=True),
                         qwen2_moe_from_hf, qwen2_moe_to_hf,
                         functools.partial(llama_links, layout=experts.QWEN2_MOE))
QWEN3_MOE = Architecture('Qwen3MoeForCausalLM', 'qwen3_moe',
                         dict(QWEN3.fixed, **MOE_FIXED, moe_shared_ffn_dim=0,
                              moe_shared_gate=False),
                         qwen3_moe_from_hf, qwen3_moe_to_hf,
                         functools.partial(llama_links, layout=experts.QWEN3_MOE))


def sequence_classification(causal_lm: Architecture) -> Architecture:
  """The *ForSequenceClassification twin of a *ForCausalLM architecture. Its labels are
  config.json's id2label (transformers' default without one: two)."""

  def from_hf(hf_config: dict) -> dict:
    labels = field(hf_config, 'id2label', {}, expected=dict)
    return dict(causal_lm.config_from_hf(hf_config),
                n_labels=len(labels) or field(hf_config, 'num_labels', 2))

  def to_hf(config) -> dict:
    return dict(causal_lm.config_to_hf(config),
                id2label={str(i): f'LABEL_{i}' for i in range(config.n_labels)},
                label2id={f'LABEL_{i}': i for i in range(config.n_labels)})

  return dataclasses.replace(
      causal_lm, name=causal_lm.name.replace('ForCausalLM', 'ForSequenceClassification'),
      fixed=_without(causal_lm.fixed, 'n_labels'), config_from_hf=from_hf, config_to_hf=to_hf)


LLAMA_SCORE, QWEN2_SCORE, QWEN3_SCORE, MISTRAL_SCORE = map(
    sequence_classification, (LLAMA, QWEN2, QWEN3, MISTRAL))
