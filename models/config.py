"""`ModelConfig`: every architectural choice of the decoder, in one frozen dataclass.

A config is plain data: it is saved as the run's config.json, compared on resume,
and overridden field by field from the command line (`--set n_layers=8`).
"""
import dataclasses
import json
import math
import typing

from lmlab.kernels import attention as attention_lib
from lmlab.kernels import grouped_matmul
from lmlab.models import kv_cache, weight_quant
from lmlab.models.errors import ConfigError
from lmlab.models.json_values import is_finite_number
from lmlab.models.rope_scaling import rope_frequencies

NORMS = ('rmsnorm', 'layernorm')
NORM_PLACEMENTS = ('pre', 'post', 'sandwich', 'deepnorm')
MLPS = ('relu', 'gelu', 'gelu_tanh', 'swiglu', 'geglu')
POSITIONS = ('rope', 'learned', 'sinusoidal', 'alibi', 'none')
ATTENTION_SCALES = ('inv_sqrt_d', 'inv_d', 'inv_cbrt_d', 'none')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('auto', *attention_lib.IMPLEMENTATIONS)
ATTENTION_TYPES = ('mha', 'mla')
HEADS = ('dense', 'normhead')
FAMILIES = ('decoder', 'encoder', 'encoder_decoder')
# Rematerialisation of each block in training: none; full (keep only the block's input,
# recompute the rest in the backward pass); matmuls (keep the outputs of the projection
# matmuls too and recompute the cheap elementwise work and the attention in between).
REMATS = ('none', 'full', 'matmuls')
# Above any width, vocabulary or context length; a larger integer field is a typo or a
# corrupt file, which must not size tables of gigabytes.
LARGEST_SIZE = 1 << 24
# Fields that only one family reads, and their values when unused.
FAMILY_FIELDS = {
    'encoder': dict(type_vocab_size=0, position_offset=0, pooler=False, mlm_head=False,
                    nsp_head=False),
    'encoder_decoder': dict(n_decoder_layers=0, embed_scale=False),
}
# Parameter-efficient fine-tuning methods ('': none, the whole model trains), and the fields
# that only each one reads, which stay at their defaults under any other peft.
PEFTS = ('', 'lora', 'adapter', 'llama_adapter', 'prompt', 'prefix')
PEFT_FIELDS = {'lora': ('lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets',
                        'lora_rslora', 'lora_quantize', 'lora_quantize_block'),
               'adapter': ('adapter_size',),
               'llama_adapter': ('adaption_layers', 'adaption_tokens'),
               'prompt': ('prompt_tokens', 'prompt_init'),
               'prefix': ('prefix_tokens', 'prefix_projection')}
# Fields that every method reads (and that stay at their defaults without one).
ANY_PEFT_FIELDS = ('trainable_tokens',)
# The methods whose learned tokens every query of a row sees: they take unpacked rows, as
# attention's mask description lets a key be seen by one segment of a packed row only.
UNPACKED_PEFTS = ('prompt', 'prefix')
# The layers of a block that LoRA adapts (models/lora.py). peft's target_modules names for
# them (q_proj, ..., gate_proj, up_proj, down_proj) are these with '_proj' and mean the same.
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
PROMPT_INITS = ('random', 'vocab')
# Mixture-of-experts routers and ways to compute the experts (models/moe.py).
MOE_ROUTERS = ('softmax_topk', 'topk_softmax')
MOE_COMPUTES = ('dropless', 'capacity', 'dense')
MOE_MATMULS = ('auto', *grouped_matmul.IMPLEMENTATIONS)
# Fields that only a mixture-of-experts model (moe_experts > 0) reads.
MOE_FIELDS = ('moe_top_k', 'moe_ffn_dim', 'moe_router', 'moe_norm_topk', 'moe_routed_scale',
              'moe_groups', 'moe_topk_groups', 'moe_shared_ffn_dim', 'moe_shared_gate',
              'moe_first_dense', 'moe_layer_freq', 'moe_compute', 'moe_matmul',
              'moe_capacity_factor',
              'moe_aux_loss_weight', 'moe_z_loss_weight')
# How QLoRA stores each adapted layer's frozen kernel (models/quantize.py); '': as it is.
LORA_QUANTIZE = ('', 'int8', 'nf4')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 0       # 0: the tokenizer's size rounded up to a multiple of 64.
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4       # == n_heads: MHA; 1: MQA; in between: GQA.
  head_dim: int = 0         # 0: d_model // n_heads.
  ffn_dim: int = 768
  max_seq_len: int = 1024

  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  norm_placement: str = 'pre'

  mlp: str = 'swiglu'
  use_bias: bool = False    # biases of the output projection and the MLP.
  qkv_bias: bool = False    # biases of the q/k/v projections (Qwen2 sets only these).

  position: str = 'rope'
  rope_theta: float = 10000.0
  # Hugging Face's rope_scaling dict as JSON, e.g. '{"rope_type": "yarn", "factor": 4.0,
  # "original_max_position_embeddings": 4096}'; empty: plain RoPE. See models/rope_scaling.py.
  rope_scaling: str = ''
  partial_rotary_factor: float = 1.0  # The share of each head's features that rotates.
  rope_interleaved: bool = False      # Pairs (2i, 2i+1) as Meta's code, not rotate-half.

  tie_embeddings: bool = False
  qk_norm: bool = False     # RMSNorm of each head's q and k before RoPE (Qwen3).
  parallel_block: bool = False  # attention and MLP read the same normed input (GPT-J).
  attention_scale: str = 'inv_sqrt_d'
  attention_impl: str = 'auto'  # attention_lib.attention's impl.
  sliding_window: int = 0       # > 0: each token sees itself and the w-1 before it (Mistral).

  # 'mha' covers MHA/GQA/MQA through n_kv_heads; 'mla' is DeepSeek-V2's multi-head latent
  # attention, shaped by the five fields after it (n_kv_heads and head_dim are unused then).
  attention_type: str = 'mha'
  kv_lora_rank: int = 0         # d_c: the joint K/V latent, the only K/V state cached.
  q_lora_rank: int = 0          # 0: queries projected directly, no compression.
  qk_rope_head_dim: int = 0     # d_h^R: the decoupled RoPE part of q and of the shared key.
  qk_nope_head_dim: int = 0     # the part of each q/k head without positions.
  v_head_dim: int = 0

  # Dual Chunk Attention (An et al. 2024) at inference; 0: off.
  dca_chunk_size: int = 0
  dca_local_size: int = 0

  head: str = 'dense'           # 'normhead': logits from row-normalised weights (Baichuan 2).
  embed_norm: bool = False      # a norm right after the token embeddings (BLOOM).

  # What the config builds (models/registry.py): a causal LM 'decoder' (models/decoder.py),
  # an 'encoder' with BERT's embeddings and heads (models/bert.py), or the 'encoder_decoder'
  # of Vaswani et al. 2017 (models/seq2seq.py), whose encoder always sees both ways.
  family: str = 'decoder'
  causal: bool = True           # False: self-attention sees both ways (a BERT encoder).
  type_vocab_size: int = 0      # encoder: token type (segment) embeddings; BERT has 2.
  # encoder: learned positions start here and count only the real tokens of attention_mask
  # (RoBERTa: padding_idx + 1); 0: positions are 0..T-1 (BERT).
  position_offset: int = 0
  pooler: bool = False          # encoder: dense + tanh of the first ([CLS]) token.
  mlm_head: bool = False        # encoder: masked-LM head, its decoder tied to the embeddings.
  nsp_head: bool = False        # encoder: next-sentence classifier on the pooled output.
  # encoder: a sequence classifier on the pooled output; decoder: a score head [D, n_labels]
  # in place of the LM head, whose output at a sequence's last token scores it (a reward
  # model has 1).
  n_labels: int = 0
  # decoder: a value head [D, 1] beside the LM head, zero at the start, estimating the return
  # at each position (PPO's critic on the policy's trunk); __call__(..., with_values=True).
  value_head: bool = False
  n_decoder_layers: int = 0     # encoder_decoder: decoder layers; 0: n_layers, as the encoder.
  embed_scale: bool = False     # encoder_decoder: embeddings times sqrt(d_model).

  # Mixture of experts (models/moe.py): moe_experts > 0 makes the MLP of the chosen layers a
  # router over that many expert MLPs of type `mlp`, moe_top_k of which run per token.
  moe_experts: int = 0
  moe_top_k: int = 2
  moe_ffn_dim: int = 0          # each expert's hidden units; 0: ffn_dim.
  moe_router: str = 'softmax_topk'  # one of MOE_ROUTERS.
  moe_norm_topk: bool = False   # softmax_topk: the k weights divided by their sum.
  moe_routed_scale: float = 1.0  # the routed experts' weights times this (DeepSeek-V2).
  moe_groups: int = 0           # > 0: DeepSeek-V2's group-limited routing over this many groups
  moe_topk_groups: int = 0      # ... of which each token picks its experts from this many.
  moe_shared_ffn_dim: int = 0   # > 0: a shared expert MLP this wide that every token passes.
  moe_shared_gate: bool = False  # the shared expert's output times sigmoid(x w) (Qwen2-MoE).
  moe_first_dense: int = 0      # the first layers keep a dense MLP (DeepSeek's first_k_dense).
  moe_layer_freq: int = 1       # then every moe_layer_freq-th layer (1-based) is MoE (Qwen).
  moe_compute: str = 'dropless'  # one of MOE_COMPUTES.
  moe_matmul: str = 'auto'      # dropless: kernels/grouped_matmul.py's implementation.
  moe_capacity_factor: float = 1.25  # moe_compute=capacity: slots per expert over the mean.
  moe_aux_loss_weight: float = 0.01  # the load-balancing loss's weight in training.
  moe_z_loss_weight: float = 0.0     # the router z-loss's (ST-MoE uses 1e-3).

  dtype: str = 'float32'        # compute dtype.
  param_dtype: str = 'float32'
  remat: str = 'none'           # one of REMATS.
  dropout_rate: float = 0.0     # on embeddings and on each sublayer's output.
  init_std: float = 0.02

  # Parameter-efficient fine-tuning: '' (none), or one of five methods whose parameters alone
  # train. 'lora' adds to each projection that lora_targets names a low-rank update
  # x A B * scale, A [d_in, rank] and B [rank, d_out], with scale lora_alpha / rank (Hu et al.
  # 2021; models/lora.py). 'adapter' puts a bottleneck after each sublayer of every block
  # (Houlsby et al. 2019; models/adapter.py). 'llama_adapter' gives the top layers' attention
  # learned prompts behind a zero-initialised gate (Zhang et al. 2023;
  # models/llama_adapter.py). 'prompt' puts trained embeddings of virtual tokens before every
  # row (Lester et al. 2021; models/prompt_tuning.py). 'prefix' gives every layer's attention
  # trained keys and values that every query sees (Li & Liang 2021; models/prefix_tuning.py).
  peft: str = ''
  lora_rank: int = 8            # U, the rank of each update.
  lora_alpha: float = 16.0      # the update's scale times the rank.
  lora_dropout: float = 0.0     # on each adapter's input, in training.
  lora_targets: str = 'q,k,v,o'  # comma-separated LORA_TARGETS (or peft's q_proj, ...).
  lora_rslora: bool = False     # scale lora_alpha / sqrt(rank) (Kalajdzievski 2023, rsLoRA).
  lora_quantize: str = ''       # QLoRA: one of LORA_QUANTIZE (Dettmers et al. 2023).
  lora_quantize_block: int = 64  # consecutive kernel values that share one absmax scale.
  adapter_size: int = 64        # the bottleneck width of each Houlsby adapter.
  adaption_layers: int = 0      # the top layers that get adaption prompts; 0: all of them.
  adaption_tokens: int = 10     # learned prompt vectors per adapted layer.
  prompt_tokens: int = 20       # P, the virtual tokens of peft=prompt.
  # 'random': normal with init_std; 'vocab': rows of the embedding table drawn at random.
  prompt_init: str = 'random'
  prefix_tokens: int = 20       # O, the trained keys and values of each layer under peft=prefix.
  prefix_projection: int = 0    # F > 0: they come from an MLP of width F (the reparameterisation).
  # Comma-separated token ids whose embedding (and output) rows train beside any method's
  # parameters, as deltas from the frozen table (models/trainable_tokens.py).
  trainable_tokens: str = ''

  # Weight-only quantisation of the dense kernels (models/weight_quant.py), each a spec such
  # as int8 or int4:g128. quantize: held as integer codes and scales (--quantize at eval,
  # generate and convert); qat: fake-quantised as they multiply (quantisation-aware training).
  quantize: str = ''
  qat: str = ''
  pruned: bool = False  # each dense kernel of the blocks has a 0/1 mask (models/pruning.py).
  # How the decoding KV cache holds keys and values (models/kv_cache.py): '' as computed,
  # 'int8' as codes with a float32 scale per position and head.
  kv_cache_dtype: str = ''

  @property
  def expert_ffn_dim(self) -> int:
    return self.moe_ffn_dim or self.ffn_dim

  def is_moe_layer(self, layer: int) -> bool:
    """Whether block `layer` (from 0) has a mixture of experts in place of its MLP."""
    return (self.moe_experts > 0 and layer >= self.moe_first_dense
            and (layer + 1) % self.moe_layer_freq == 0)

  @property
  def moe_layers(self) -> int:
    return sum(map(self.is_moe_layer, range(self.n_layers)))

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def qk_head_dim(self) -> int:
    """Features per head in the query-key product."""
    if self.attention_type == 'mla':
      return self.qk_nope_head_dim + self.qk_rope_head_dim
    return self.resolved_head_dim

  @property
  def rope_head_dim(self) -> int:
    """Features per head that RoPE sees: the decoupled part for MLA, else the whole head."""
    return self.qk_rope_head_dim if self.attention_type == 'mla' else self.resolved_head_dim

  @property
  def rope_scaling_dict(self):
    """rope_scaling parsed, or None."""
    if not self.rope_scaling:
      return None
    try:
      scaling = json.loads(self.rope_scaling)
    except (ValueError, RecursionError) as e:
      raise ConfigError(f'rope_scaling={self.rope_scaling!r:.60} is not JSON ({e})') from None
    if not isinstance(scaling, dict):
      raise ConfigError(f'rope_scaling={self.rope_scaling!r} must be a JSON object')
    return scaling

  @property
  def lora_target_names(self) -> tuple:
    """lora_targets as LORA_TARGETS names, each once, in the order given."""
    names = []
    for item in self.lora_targets.split(','):
      name = item.strip().removesuffix('_proj')
      if name not in LORA_TARGETS:
        raise ConfigError(f'lora_targets={self.lora_targets!r}: {item.strip()!r} is not one of '
                          f'{", ".join(LORA_TARGETS)} (or peft\'s q_proj, ..., down_proj)')
      if name not in names:
        names.append(name)
    return tuple(names)

  @property
  def trainable_token_ids(self) -> tuple:
    """trainable_tokens as distinct ints, each a token of the vocabulary."""
    ids = []
    for item in filter(None, (part.strip() for part in self.trainable_tokens.split(','))):
      # vocab_size 0 is the tokenizer's, which a run sets before it builds the model.
      if not item.isdigit() or 0 < self.vocab_size <= int(item):
        raise ConfigError(f'trainable_tokens={self.trainable_tokens!r}: {item!r} is not a token '
                          f'id below vocab_size={self.vocab_size}')
      if int(item) in ids:
        raise ConfigError(f'trainable_tokens={self.trainable_tokens!r} lists {item} twice')
      ids.append(int(item))
    return tuple(ids)

  @property
  def lora_scale(self) -> float:
    """What each LoRA update x A B is multiplied by."""
    return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

  @property
  def softmax_scale(self) -> float:
    d = self.qk_head_dim
    return {'inv_sqrt_d': d ** -0.5, 'inv_d': 1.0 / d, 'inv_cbrt_d': d ** (-1.0 / 3.0),
            'none': 1.0}[self.attention_scale]

  def check_positions(self, length: int, what: str, fix: str = ''):
    """Raises ConfigError when `length` positions (what: a description) run past a learned
    position table; fix, when given, says what to change."""
    if self.position == 'learned' and length + self.position_offset > self.max_seq_len:
      offset = f', position_offset={self.position_offset}' if self.position_offset else ''
      raise ConfigError(f'{what} ({length}) is longer than the learned position table '
                        f'(max_seq_len={self.max_seq_len}{offset}){"; " + fix if fix else ""}')

  def buildable(self, family: str) -> 'ModelConfig':
    """The validated config, checked to be one a model of `family` can be built from."""
    self.validate()
    if self.family != family:
      raise ConfigError(f'a {family} model cannot be built from a family={self.family} config')
    if not self.vocab_size:
      raise ConfigError('vocab_size=0 (take it from the tokenizer or data) must be resolved '
                        'before a model is built; see training.language_modeling.resolve_vocab')
    return self

  def validate(self) -> 'ModelConfig':
    choices = {'norm': NORMS, 'norm_placement': NORM_PLACEMENTS, 'mlp': MLPS,
               'position': POSITIONS, 'attention_scale': ATTENTION_SCALES,
               'dtype': DTYPES, 'param_dtype': DTYPES, 'attention_impl': ATTENTION_IMPLS,
               'attention_type': ATTENTION_TYPES, 'head': HEADS, 'family': FAMILIES,
               'remat': REMATS, 'kv_cache_dtype': kv_cache.KV_CACHE_DTYPES}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f'{name}={getattr(self, name)!r} is not one of '
                          f'{", ".join(str(a) or repr(a) for a in allowed)}')
    for f in dataclasses.fields(self):
      if f.type is int and abs(getattr(self, f.name)) > LARGEST_SIZE:
        raise ConfigError(f'{f.name}={getattr(self, f.name)} is beyond {LARGEST_SIZE}, larger '
                          'than any model\'s; a typo?')
    if self.vocab_size < 0:
      raise ConfigError(f'vocab_size={self.vocab_size} must be positive (or 0: the tokenizer\'s)')
    for name in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'ffn_dim',
                 'max_seq_len'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be positive')
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f'n_heads={self.n_heads} is not divisible by n_kv_heads='
                        f'{self.n_kv_heads}; pick n_kv_heads among the divisors of n_heads')
    if self.attention_type == 'mha' and not self.head_dim and self.d_model % self.n_heads:
      raise ConfigError(f'd_model={self.d_model} is not divisible by n_heads={self.n_heads}; '
                        'set head_dim explicitly')
    if self.attention_type == 'mla':
      # ALiBi works with MLA: its bias depends on positions only, not on the key features.
      for name in ('kv_lora_rank', 'qk_rope_head_dim', 'qk_nope_head_dim', 'v_head_dim'):
        if getattr(self, name) <= 0:
          raise ConfigError(f'{name}={getattr(self, name)} must be positive with '
                            'attention_type=mla')
      if self.q_lora_rank < 0:
        raise ConfigError(f'q_lora_rank={self.q_lora_rank} must be >= 0 (0: no compression)')
      if self.position == 'rope' and self.qk_rope_head_dim % 2:
        raise ConfigError(f'RoPE needs an even qk_rope_head_dim, got {self.qk_rope_head_dim}')
      if self.qk_norm:
        raise ConfigError('qk_norm is not defined for attention_type=mla (its latents are '
                          'normalised already); set qk_norm=false')
      if self.dca_chunk_size:
        raise ConfigError('dual chunk attention (dca_chunk_size) is not implemented for '
                          'attention_type=mla')
    if self.position == 'rope':
      if self.rope_head_dim % 2:
        raise ConfigError(f'RoPE needs an even head_dim, got {self.rope_head_dim}')
      if not 0.0 < self.partial_rotary_factor <= 1.0:
        raise ConfigError(f'partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]')
      rope_frequencies(self.rope_head_dim, self.rope_theta, self.rope_scaling_dict,
                       partial_rotary_factor=self.partial_rotary_factor,
                       max_position_embeddings=self.max_seq_len)  # Raises on a bad dict.
    if self.position == 'sinusoidal' and self.d_model % 2:
      raise ConfigError(f'sinusoidal positions need an even d_model, got {self.d_model}')
    for name in ('sliding_window', 'dca_chunk_size', 'dca_local_size'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be >= 0 (0: off)')
    self._validate_dca()
    self._validate_moe()
    self._validate_family()
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'dropout_rate={self.dropout_rate} must be in [0, 1)')
    self._validate_peft()
    self._validate_compression()
    return self

  def _validate_compression(self):
    for name in ('quantize', 'qat', 'pruned'):
      if not getattr(self, name):
        continue
      if name != 'pruned':
        weight_quant.parse_spec(getattr(self, name), name)
      if self.family != 'decoder' or self.peft:
        raise ConfigError(f'{name}={getattr(self, name)!r} applies to the kernels of a decoder '
                          f'without PEFT (here family={self.family}, peft={self.peft!r}); merge '
                          'LoRA first (--mode=merge)')
    if self.quantize and self.qat:
      raise ConfigError(f'quantize={self.quantize!r} holds the kernels quantised already; '
                        f'qat={self.qat!r} applies to float kernels')
    if self.kv_cache_dtype and self.attention_type == 'mla':
      raise ConfigError(f'kv_cache_dtype={self.kv_cache_dtype!r} quantises cached keys and '
                        'values; attention_type=mla caches a latent instead')

  def _validate_dca(self):
    chunk, local = self.dca_chunk_size, self.dca_local_size
    if not chunk:
      if local:
        raise ConfigError(f'dca_local_size={local} needs dca_chunk_size > 0 (0: DCA off)')
      return
    if self.position != 'rope':
      raise ConfigError(f'dca_chunk_size={chunk}: dual chunk attention remaps RoPE positions; '
                        f'it needs position=rope, not {self.position!r}')
    if self.sliding_window:
      raise ConfigError(f'dca_chunk_size={chunk} and sliding_window={self.sliding_window} '
                        'cannot be combined; set one of them to 0')
    if 2 * local >= chunk:
      raise ConfigError(f'dca_local_size={local} must be less than half of dca_chunk_size='
                        f'{chunk}: chunks hold chunk_size - local_size tokens, and the local '
                        'window must fit in one (Qwen2.5-1M: 262144 and 8192)')

  def _validate_moe(self):
    if not self.moe_experts:
      for name in MOE_FIELDS:
        if getattr(self, name) != getattr(ModelConfig, name):
          raise ConfigError(f'{name}={getattr(self, name)!r} applies to a mixture of experts '
                            'only; set moe_experts > 0')
      return
    if self.moe_experts < 0:
      raise ConfigError(f'moe_experts={self.moe_experts} must be >= 0 (0: a dense MLP)')
    if not 0 < self.moe_top_k <= self.moe_experts:
      raise ConfigError(f'moe_top_k={self.moe_top_k} must be in [1, moe_experts='
                        f'{self.moe_experts}]')
    choices = {'moe_router': MOE_ROUTERS, 'moe_compute': MOE_COMPUTES,
               'moe_matmul': MOE_MATMULS}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f'{name}={getattr(self, name)!r} is not one of {", ".join(allowed)}')
    for name in ('moe_ffn_dim', 'moe_shared_ffn_dim', 'moe_first_dense', 'moe_groups',
                 'moe_topk_groups'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be >= 0')
    if self.moe_layer_freq <= 0:
      raise ConfigError(f'moe_layer_freq={self.moe_layer_freq} must be positive')
    if self.moe_norm_topk and self.moe_router != 'softmax_topk':
      raise ConfigError('moe_norm_topk=true renormalises softmax_topk\'s weights; '
                        f'moe_router={self.moe_router} sums to 1 already')
    if self.moe_shared_gate and not self.moe_shared_ffn_dim:
      raise ConfigError('moe_shared_gate=true gates a shared expert; set moe_shared_ffn_dim')
    if self.moe_groups or self.moe_topk_groups:
      if not 0 < self.moe_topk_groups <= self.moe_groups or self.moe_experts % self.moe_groups:
        raise ConfigError(f'moe_groups={self.moe_groups} must divide moe_experts='
                          f'{self.moe_experts}, and moe_topk_groups={self.moe_topk_groups} be in '
                          '[1, moe_groups]')
      if self.moe_top_k > self.moe_topk_groups * (self.moe_experts // self.moe_groups):
        raise ConfigError(f'moe_top_k={self.moe_top_k} is more experts than '
                          f'moe_topk_groups={self.moe_topk_groups} groups hold')
    for name in ('moe_routed_scale', 'moe_capacity_factor'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be positive')
    for name in ('moe_aux_loss_weight', 'moe_z_loss_weight'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be >= 0')
    if self.family != 'decoder':
      raise ConfigError(f'moe_experts={self.moe_experts}: mixtures of experts are implemented '
                        f'for family=decoder only, not {self.family}')
    if self.use_bias:
      raise ConfigError('use_bias=true: the experts have no biases; set use_bias=false with '
                        'moe_experts > 0')

  def _validate_family(self):
    for family, unused in FAMILY_FIELDS.items():
      for name, value in unused.items():
        if self.family != family and getattr(self, name) != value:
          raise ConfigError(f'{name}={getattr(self, name)!r} applies to family={family} only, '
                            f'not {self.family}')
    for name in ('type_vocab_size', 'position_offset', 'n_labels', 'n_decoder_layers'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be >= 0')
    if self.family != 'encoder' and not self.causal:
      raise ConfigError(f'causal=false: the {self.family} would see the token it predicts (an '
                        'encoder_decoder\'s encoder is bidirectional already)')
    if self.family != 'decoder':
      for name, value in (('attention_type', 'mha'), ('dca_chunk_size', 0)):
        if getattr(self, name) != value:
          raise ConfigError(f'{name}={getattr(self, name)!r} is implemented for family=decoder '
                            f'only, not {self.family}')
    if self.family == 'encoder_decoder' and self.parallel_block:
      raise ConfigError('parallel_block=true has no place for the decoder\'s cross-attention; '
                        'set parallel_block=false with family=encoder_decoder')
    if not self.causal and self.sliding_window:
      raise ConfigError(f'sliding_window={self.sliding_window} needs causal attention; set '
                        'sliding_window=0 with causal=false')
    if self.family == 'encoder' and (self.nsp_head or self.n_labels) and not self.pooler:
      raise ConfigError('nsp_head and n_labels classify the pooled output; set pooler=true')
    if self.value_head and (self.family != 'decoder' or self.n_labels):
      raise ConfigError('value_head=true goes beside the LM head of a decoder (family=decoder, '
                        'n_labels=0)')
    if self.family == 'encoder_decoder' and self.n_labels:
      raise ConfigError(f'n_labels={self.n_labels} applies to family=encoder or decoder, not '
                        'encoder_decoder')
    if self.position_offset and self.position != 'learned':
      raise ConfigError(f'position_offset={self.position_offset} indexes a learned position '
                        f'table; it needs position=learned, not {self.position!r}')

  def _validate_peft(self):
    if self.peft not in PEFTS:
      raise ConfigError(f'peft={self.peft!r} is not one of {", ".join(map(repr, PEFTS))}')
    for method, names in PEFT_FIELDS.items():
      for name in names:
        # A dataclass field's class attribute is its default.
        if self.peft != method and getattr(self, name) != getattr(ModelConfig, name):
          raise ConfigError(f'{name}={getattr(self, name)!r} applies to peft={method} only, not '
                            f'peft={self.peft!r}')
    if not self.peft:
      if self.trainable_tokens:
        raise ConfigError(f'trainable_tokens={self.trainable_tokens!r} trains rows beside a PEFT '
                          'method; set peft (without one, every row trains)')
      return
    self.trainable_token_ids  # Raises on a bad list.
    if self.family != 'decoder':
      raise ConfigError(f'peft={self.peft} adapts a decoder, not family={self.family}')
    # Houlsby adapters sit on the block's sublayers and prompts before the first block,
    # whatever the attention inside.
    if self.peft in ('lora', 'llama_adapter', 'prefix') and self.attention_type != 'mha':
      raise ConfigError(f'peft={self.peft} adapts the MHA projections; attention_type='
                        f'{self.attention_type} is not covered')
    {'lora': self._validate_lora, 'adapter': self._validate_adapter,
     'llama_adapter': self._validate_llama_adapter, 'prompt': self._validate_prompt,
     'prefix': self._validate_prefix}[self.peft]()

  def _validate_lora(self):
    if self.lora_rank <= 0:
      raise ConfigError(f'lora_rank={self.lora_rank} must be positive')
    if self.lora_alpha <= 0:
      raise ConfigError(f'lora_alpha={self.lora_alpha} must be positive')
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ConfigError(f'lora_dropout={self.lora_dropout} must be in [0, 1)')
    mlp_targets = [name for name in self.lora_target_names if name in ('gate', 'up', 'down')]
    if self.moe_experts and mlp_targets:
      raise ConfigError(f'lora_targets={self.lora_targets!r}: LoRA of a mixture of experts\' '
                        f'MLPs ({", ".join(mlp_targets)}) is not implemented; target q, k, v, o')
    if self.lora_quantize not in LORA_QUANTIZE:
      raise ConfigError(f'lora_quantize={self.lora_quantize!r} is not one of '
                        f'{", ".join(map(repr, LORA_QUANTIZE))}')
    if self.lora_quantize_block != ModelConfig.lora_quantize_block and not self.lora_quantize:
      raise ConfigError(f'lora_quantize_block={self.lora_quantize_block} applies to a quantised '
                        'kernel only; set lora_quantize=int8 or nf4')
    # nf4 packs two codes into each byte, and a block into whole bytes.
    if self.lora_quantize_block <= 0 or self.lora_quantize_block % 2:
      raise ConfigError(f'lora_quantize_block={self.lora_quantize_block} must be positive and '
                        'even')

  def _validate_adapter(self):
    if self.adapter_size <= 0:
      raise ConfigError(f'adapter_size={self.adapter_size} must be positive')

  def _validate_llama_adapter(self):
    if not 0 <= self.adaption_layers <= self.n_layers:
      raise ConfigError(f'adaption_layers={self.adaption_layers} must be in [0, n_layers='
                        f'{self.n_layers}] (0: every layer)')
    if self.adaption_tokens <= 0:
      raise ConfigError(f'adaption_tokens={self.adaption_tokens} must be positive')
    if self.dca_chunk_size:
      raise ConfigError('peft=llama_adapter needs the queries after RoPE, which dual chunk '
                        'attention (dca_chunk_size) does not form; set dca_chunk_size=0')

  def _validate_prompt(self):
    if self.prompt_tokens <= 0:
      raise ConfigError(f'prompt_tokens={self.prompt_tokens} must be positive')
    if self.prompt_init not in PROMPT_INITS:
      raise ConfigError(f'prompt_init={self.prompt_init!r} is not one of '
                        f'{", ".join(PROMPT_INITS)}')
    self.check_positions(self.prompt_tokens, 'prompt_tokens', 'use fewer virtual tokens')

  def _validate_prefix(self):
    if self.prefix_tokens <= 0:
      raise ConfigError(f'prefix_tokens={self.prefix_tokens} must be positive')
    if self.prefix_projection < 0:
      raise ConfigError(f'prefix_projection={self.prefix_projection} must be >= 0 (0: no MLP)')
    if self.sliding_window:
      raise ConfigError('peft=prefix: a sliding window would hide the prefix from queries '
                        'past it; set sliding_window=0')
    if self.dca_chunk_size:
      raise ConfigError('peft=prefix puts keys before position 0, which dual chunk attention '
                        '(dca_chunk_size) does not take; set dca_chunk_size=0')

  @property
  def decoder_layers(self) -> int:
    """Layers of an encoder_decoder's decoder."""
    return self.n_decoder_layers or self.n_layers


def without_peft(config: ModelConfig) -> ModelConfig:
  """The config of the model that config's adapters adapt (or are merged into): peft='' and
  every peft field at its default."""
  names = (*ANY_PEFT_FIELDS, *(name for names in PEFT_FIELDS.values() for name in names))
  return dataclasses.replace(config, peft='', **{name: getattr(ModelConfig, name)
                                                 for name in names})


def check_adds(method: str, config: ModelConfig, model_config: ModelConfig, adder: str):
  """Raises unless `config` has peft=method and describes the model of model_config to which
  `adder` adds its parameters: config itself or its base, without_peft(config)."""
  if config.peft != method:
    raise ConfigError(f'{adder} needs a config with peft={method}, not peft={config.peft!r}')
  if model_config not in (config, without_peft(config)):
    raise ConfigError(f'{adder}: the config describes another model than the one given (they '
                      'must differ in the peft fields only)')


def _llama(**fields) -> ModelConfig:
  base = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
              use_bias=False, qkv_bias=False, tie_embeddings=False)
  return ModelConfig(**{**base, **fields})


def _qwen2(**fields) -> ModelConfig:
  return _llama(qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, **fields)


def _deepseek_v2(**fields) -> ModelConfig:
  """DeepSeek-V2: MLA attention, interleaved RoPE, and DeepSeekMoE layers after the first."""
  return _llama(attention_type='mla', rope_interleaved=True, norm_eps=1e-6, moe_first_dense=1,
                **fields)


def _bert(**fields) -> ModelConfig:
  """BERT's encoder with its pre-training heads (BertForPreTraining)."""
  base = dict(family='encoder', causal=False, norm='layernorm', norm_eps=1e-12,
              norm_placement='post', mlp='gelu', position='learned', max_seq_len=512,
              use_bias=True, qkv_bias=True, tie_embeddings=True, embed_norm=True,
              type_vocab_size=2, pooler=True, mlm_head=True, nsp_head=True)
  return ModelConfig(**{**base, **fields})


def _transformer(**fields) -> ModelConfig:
  """The encoder-decoder of Vaswani et al. 2017, one vocabulary shared by source, target
  and output."""
  base = dict(family='encoder_decoder', norm='layernorm', norm_eps=1e-6, norm_placement='post',
              mlp='relu', position='sinusoidal', max_seq_len=1024, use_bias=True,
              qkv_bias=True, tie_embeddings=True, embed_scale=True)
  return ModelConfig(**{**base, **fields})


PRESETS = {
    # Learns Python source byte by byte on a laptop CPU in minutes.
    'tiny': ModelConfig(vocab_size=0, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        ffn_dim=384, max_seq_len=1024),
    'llama2-7b': _llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=32, ffn_dim=11008, max_seq_len=4096, norm_eps=1e-5),
    'llama3-8b': _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=8, ffn_dim=14336, max_seq_len=8192, norm_eps=1e-5,
                        rope_theta=500000.0),
    # GPT-2 small's parameter count (124M) as a LLaMA: a model for one GPU's throughput.
    'llama-125m': _llama(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                         n_kv_heads=12, ffn_dim=2560, max_seq_len=2048, tie_embeddings=True),
    'qwen2-0.5b': _qwen2(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, ffn_dim=4864, tie_embeddings=True),
    'qwen2-1.5b': _qwen2(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                         n_kv_heads=2, ffn_dim=8960, tie_embeddings=True),
    'qwen2-7b': _qwen2(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, ffn_dim=18944, tie_embeddings=False),
    # Mixtures of experts; param_count and active_param_count (per token) in models/registry.py.
    'mixtral-8x7b': _llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                           ffn_dim=14336, max_seq_len=32768, rope_theta=1e6, moe_experts=8,
                           moe_top_k=2, moe_router='topk_softmax', moe_aux_loss_weight=0.02),
    'qwen2-57b-a14b': _qwen2(vocab_size=151936, d_model=3584, n_layers=28, n_heads=28,
                             n_kv_heads=4, ffn_dim=18944, moe_experts=64, moe_top_k=8,
                             moe_ffn_dim=2560, moe_shared_ffn_dim=20480, moe_shared_gate=True,
                             moe_aux_loss_weight=0.001),
    'deepseek-v2-lite': _deepseek_v2(
        vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, n_kv_heads=16, ffn_dim=10944,
        max_seq_len=163840, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, rope_scaling=json.dumps(dict(
            type='yarn', factor=40, original_max_position_embeddings=4096, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
        moe_experts=64, moe_top_k=6, moe_ffn_dim=1408, moe_shared_ffn_dim=2816,
        moe_aux_loss_weight=0.001),
    # Pre-trains with MLM + NSP on a laptop CPU in minutes (Turc et al. 2019's BERT-Tiny).
    'bert-tiny': _bert(vocab_size=0, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2,
                       ffn_dim=512),
    'bert-base': _bert(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                       ffn_dim=3072, dropout_rate=0.1),
    'bert-large': _bert(vocab_size=30522, d_model=1024, n_layers=24, n_heads=16,
                        n_kv_heads=16, ffn_dim=4096, dropout_rate=0.1),
    # RoBERTa's objective: masked LM only, so no pooler and no next-sentence head.
    'roberta-tiny': _bert(vocab_size=0, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2,
                          ffn_dim=512, pooler=False, nsp_head=False),
    'transformer-tiny': _transformer(vocab_size=0, d_model=128, n_layers=2, n_heads=4,
                                     n_kv_heads=4, ffn_dim=512, max_seq_len=256),
    'transformer-base': _transformer(vocab_size=37000, d_model=512, n_layers=6, n_heads=8,
                                     n_kv_heads=8, ffn_dim=2048, dropout_rate=0.1),
    'transformer-big': _transformer(vocab_size=37000, d_model=1024, n_layers=6, n_heads=16,
                                    n_kv_heads=16, ffn_dim=4096, dropout_rate=0.3),
}


def preset(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f'unknown model preset {name!r}; choose one of {", ".join(PRESETS)}')
  return PRESETS[name]


def _parse_value(field: dataclasses.Field, text: str):
  kind = typing.get_type_hints(ModelConfig)[field.name]
  if kind is bool:
    if text.lower() in ('1', 'true', 'yes', 'on'):
      return True
    if text.lower() in ('0', 'false', 'no', 'off'):
      return False
    raise ConfigError(f'{field.name}={text!r}: expected true or false')
  try:
    value = kind(text)
  except ValueError:
    raise ConfigError(f'{field.name}={text!r}: expected a {kind.__name__}') from None
  if kind is float and not math.isfinite(value):
    raise ConfigError(f'{field.name}={text!r}: expected a finite number')
  return value


def with_overrides(config: ModelConfig, assignments) -> ModelConfig:
  """Applies 'field=value' strings, e.g. from repeated `--set` flags."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  changes = {}
  for assignment in assignments:
    name, sep, text = assignment.partition('=')
    name = name.strip()
    if not sep:
      raise ConfigError(f'--set {assignment!r}: expected field=value')
    if name not in fields:
      raise ConfigError(f'unknown config field {name!r}; known fields: {", ".join(fields)}')
    changes[name] = _parse_value(fields[name], text.strip())
  return dataclasses.replace(config, **changes)


def to_dict(config: ModelConfig) -> dict:
  return dataclasses.asdict(config)


def from_dict(fields: dict) -> ModelConfig:
  """The config of to_dict's form (as read from a file), each field checked for its type."""
  if not isinstance(fields, dict):
    raise ConfigError(f'a model config must be an object of fields, not {fields!r:.60}')
  types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  unknown = set(fields) - set(types)
  if unknown:
    raise ConfigError(f'unknown config fields {sorted(unknown)}')
  if isinstance(fields.get('remat'), bool):  # Configs saved before remat named a policy.
    fields = {**fields, 'remat': 'full' if fields['remat'] else 'none'}
  for name, value in fields.items():
    if not (is_finite_number(value) if types[name] is float else type(value) is types[name]):
      wanted = 'a finite number' if types[name] is float else f'of type {types[name].__name__}'
      raise ConfigError(f'{name}={value!r:.60} is not {wanted}')
  return ModelConfig(**fields)
