"""`ModelConfig`: every architectural choice of the decoder, in one frozen dataclass.

A config is plain data: it is saved as the run's config.json, compared on resume,
and overridden field by field from the command line (`--set n_layers=8`).
"""
import dataclasses
import json
import math
import typing

import kernels
from models import ConfigError
from models.rope_scaling import rope_frequencies

NORMS = ('rmsnorm', 'layernorm')
NORM_PLACEMENTS = ('pre', 'post', 'sandwich', 'deepnorm')
MLPS = ('relu', 'gelu', 'gelu_tanh', 'swiglu', 'geglu')
POSITIONS = ('rope', 'learned', 'sinusoidal', 'alibi', 'none')
ATTENTION_SCALES = ('inv_sqrt_d', 'inv_d', 'inv_cbrt_d', 'none')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_IMPLS = ('auto', *kernels.IMPLEMENTATIONS)


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
  attention_impl: str = 'auto'  # kernels.attention's impl.

  dtype: str = 'float32'        # compute dtype.
  param_dtype: str = 'float32'
  remat: bool = False
  dropout_rate: float = 0.0     # on embeddings and on each sublayer's output.
  init_std: float = 0.02

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rope_scaling_dict(self):
    """rope_scaling parsed, or None."""
    if not self.rope_scaling:
      return None
    try:
      scaling = json.loads(self.rope_scaling)
    except ValueError as e:
      raise ConfigError(f'rope_scaling={self.rope_scaling!r} is not JSON ({e})') from None
    if not isinstance(scaling, dict):
      raise ConfigError(f'rope_scaling={self.rope_scaling!r} must be a JSON object')
    return scaling

  @property
  def softmax_scale(self) -> float:
    d = self.resolved_head_dim
    return {'inv_sqrt_d': d ** -0.5, 'inv_d': 1.0 / d, 'inv_cbrt_d': d ** (-1.0 / 3.0),
            'none': 1.0}[self.attention_scale]

  def validate(self) -> 'ModelConfig':
    choices = {'norm': NORMS, 'norm_placement': NORM_PLACEMENTS, 'mlp': MLPS,
               'position': POSITIONS, 'attention_scale': ATTENTION_SCALES,
               'dtype': DTYPES, 'param_dtype': DTYPES, 'attention_impl': ATTENTION_IMPLS}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f'{name}={getattr(self, name)!r} is not one of {", ".join(allowed)}')
    if self.vocab_size < 0:
      raise ConfigError(f'vocab_size={self.vocab_size} must be positive (or 0: the tokenizer\'s)')
    for name in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'ffn_dim',
                 'max_seq_len'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be positive')
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(f'n_heads={self.n_heads} is not divisible by n_kv_heads='
                        f'{self.n_kv_heads}; pick n_kv_heads among the divisors of n_heads')
    if not self.head_dim and self.d_model % self.n_heads:
      raise ConfigError(f'd_model={self.d_model} is not divisible by n_heads={self.n_heads}; '
                        'set head_dim explicitly')
    if self.position == 'rope':
      if self.resolved_head_dim % 2:
        raise ConfigError(f'RoPE needs an even head_dim, got {self.resolved_head_dim}')
      if not 0.0 < self.partial_rotary_factor <= 1.0:
        raise ConfigError(f'partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]')
      rope_frequencies(self.resolved_head_dim, self.rope_theta, self.rope_scaling_dict,
                       partial_rotary_factor=self.partial_rotary_factor,
                       max_position_embeddings=self.max_seq_len)  # Raises on a bad dict.
    if self.position == 'sinusoidal' and self.d_model % 2:
      raise ConfigError(f'sinusoidal positions need an even d_model, got {self.d_model}')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'dropout_rate={self.dropout_rate} must be in [0, 1)')
    return self


def _llama(**fields) -> ModelConfig:
  base = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
              use_bias=False, qkv_bias=False, tie_embeddings=False)
  return ModelConfig(**{**base, **fields})


def _qwen2(**fields) -> ModelConfig:
  return _llama(qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, **fields)


PRESETS = {
    # Learns Python source byte by byte on a laptop CPU in minutes.
    'tiny': ModelConfig(vocab_size=0, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        ffn_dim=384, max_seq_len=1024),
    'llama2-7b': _llama(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=32, ffn_dim=11008, max_seq_len=4096, norm_eps=1e-5),
    'llama3-8b': _llama(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=8, ffn_dim=14336, max_seq_len=8192, norm_eps=1e-5,
                        rope_theta=500000.0),
    'qwen2-0.5b': _qwen2(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                         n_kv_heads=2, ffn_dim=4864, tie_embeddings=True),
    'qwen2-1.5b': _qwen2(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                         n_kv_heads=2, ffn_dim=8960, tie_embeddings=True),
    'qwen2-7b': _qwen2(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                       n_kv_heads=4, ffn_dim=18944, tie_embeddings=False),
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
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(fields) - known
  if unknown:
    raise ConfigError(f'unknown config fields {sorted(unknown)}')
  return ModelConfig(**fields)
