"""RoPE scaling frequencies against transformers' own (PyTorch) implementations."""
import jax
import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')
from transformers import GPTNeoXConfig, LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402

from lmlab.models.config import ConfigError  # noqa: E402
from lmlab.models.rope_scaling import rope_frequencies  # noqa: E402


def draw_head(rng):
  """(head_dim, theta, partial_rotary_factor): head_dim even in 16..128; half the time a fraction
  of it whose product int() truncates to an even rotary dimension."""
  head_dim = 2 * int(rng.integers(8, 65))
  theta = float(10.0 ** rng.uniform(3.5, 6.5))
  if rng.random() < 0.5:
    return head_dim, theta, 1.0
  rotary_dim = 2 * int(rng.integers(2, head_dim // 2))
  return head_dim, theta, (rotary_dim + float(rng.uniform(0.1, 0.9))) / head_dim


def hf_rope_config(head_dim, theta, partial_rotary_factor, scaling, max_position_embeddings):
  return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                     max_position_embeddings=max_position_embeddings,
                     rope_parameters={**scaling, 'rope_theta': theta,
                                      'partial_rotary_factor': partial_rotary_factor})


def assert_close_to(ours, expected):
  inv_freq, attention_factor = ours
  expected_inv_freq, expected_attention_factor = expected
  assert inv_freq.dtype == np.float32
  np.testing.assert_allclose(np.asarray(inv_freq), np.asarray(expected_inv_freq), rtol=1e-6, atol=0)
  assert attention_factor == pytest.approx(float(expected_attention_factor), rel=1e-6)


def check_against_hf(rng, scaling, *, max_position_embeddings, seq_len=None, theta=None):
  head_dim, drawn_theta, partial_rotary_factor = draw_head(rng)
  theta = theta or drawn_theta
  config = hf_rope_config(head_dim, theta, partial_rotary_factor, scaling, max_position_embeddings)
  rope_type = scaling.get('rope_type', scaling.get('type'))
  expected = ROPE_INIT_FUNCTIONS[rope_type](config, device='cpu', seq_len=seq_len)
  ours = rope_frequencies(head_dim, theta, scaling, partial_rotary_factor=partial_rotary_factor,
                          max_position_embeddings=max_position_embeddings, seq_len=seq_len)
  assert_close_to(ours, expected)


@pytest.mark.parametrize('scaling', [None, {}, {'rope_type': 'default'}, {'type': 'default'}])
def test_default_matches_hf(rng, scaling):
  head_dim, theta, partial_rotary_factor = draw_head(rng)
  config = GPTNeoXConfig(hidden_size=2 * head_dim, num_attention_heads=2,
                         rope_parameters={'rope_type': 'default', 'rope_theta': theta,
                                          'partial_rotary_factor': partial_rotary_factor})
  expected = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
  assert_close_to(rope_frequencies(head_dim, theta, scaling,
                                   partial_rotary_factor=partial_rotary_factor), expected)


@pytest.mark.parametrize('type_key', ['rope_type', 'type'])
def test_linear_matches_hf(rng, type_key):
  scaling = {type_key: 'linear', 'factor': float(rng.uniform(1.0, 16.0))}
  check_against_hf(rng, scaling, max_position_embeddings=int(rng.integers(128, 8192)))


def test_static_ntk_matches_formula(rng):
  head_dim, theta, partial_rotary_factor = draw_head(rng)
  factor = float(rng.uniform(1.0, 16.0))
  inv_freq, attention_factor = rope_frequencies(head_dim, theta, {'rope_type': 'ntk',
                                                                  'factor': factor},
                                                partial_rotary_factor=partial_rotary_factor)
  dim = int(head_dim * partial_rotary_factor)
  base = theta * factor ** (dim / (dim - 2))
  expected = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  np.testing.assert_allclose(np.asarray(inv_freq), expected, rtol=1e-6, atol=0)
  assert attention_factor == 1.0


@pytest.mark.parametrize('length', ['unset', 'within', 'beyond'])
def test_dynamic_matches_hf(rng, length):
  max_position_embeddings = int(rng.integers(128, 4096))
  seq_len = {'unset': None,
             'within': int(rng.integers(1, max_position_embeddings + 1)),
             'beyond': int(rng.integers(max_position_embeddings + 1, 8 * max_position_embeddings))
             }[length]
  # transformers scales against max_position_embeddings and ignores an original length here.
  scaling = {'rope_type': 'dynamic', 'factor': float(rng.uniform(1.0, 8.0)),
             'original_max_position_embeddings': max_position_embeddings // 4}
  check_against_hf(rng, scaling, max_position_embeddings=max_position_embeddings, seq_len=seq_len)


@pytest.mark.parametrize('variant', ['plain', 'betas', 'mscale', 'attention_factor',
                                     'untruncated', 'clamped', 'collapsed'])
def test_yarn_matches_hf(rng, variant):
  factor = float(rng.uniform(1.0, 16.0))
  original_max = int(rng.integers(256, 8192))
  fastest_turns = original_max / (2 * np.pi)  # of the highest frequency, within original_max
  scaling = {'rope_type': 'yarn', 'factor': factor,
             'original_max_position_embeddings': original_max}
  scaling.update({
      'plain': {},
      'betas': {'beta_fast': float(rng.uniform(8, 64)), 'beta_slow': float(rng.uniform(0.5, 4))},
      'mscale': {'mscale': float(rng.uniform(0.5, 2)),
                 'mscale_all_dim': float(rng.uniform(0.5, 2))},
      'attention_factor': {'attention_factor': float(rng.uniform(0.5, 2))},
      'untruncated': {'truncate': False},
      # With a tiny theta, the ramp's ends fall beyond both ends of the head.
      'clamped': {'beta_fast': 4.0 * original_max},
      # Both ends land on index 0: an empty ramp.
      'collapsed': {'beta_fast': 2.0 * fastest_turns, 'beta_slow': 1.01 * fastest_turns},
  }[variant])
  theta = float(rng.uniform(1.5, 4.0)) if variant == 'clamped' else None
  check_against_hf(rng, scaling, max_position_embeddings=int(original_max * factor), theta=theta)


def test_llama3_matches_hf(rng):
  head_dim, theta, partial_rotary_factor = draw_head(rng)
  factor = float(rng.uniform(2.0, 32.0))
  low_freq_factor = float(rng.uniform(0.5, 2.0))
  original_max = int(rng.integers(512, 16384))
  scaling = {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low_freq_factor,
             'high_freq_factor': low_freq_factor + float(rng.uniform(1.0, 6.0)),
             'original_max_position_embeddings': original_max}
  config = hf_rope_config(head_dim, theta, partial_rotary_factor, scaling,
                          int(original_max * factor))
  expected_inv_freq, expected_attention_factor = ROPE_INIT_FUNCTIONS['llama3'](config,
                                                                                device='cpu')
  inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling,
                                                partial_rotary_factor=partial_rotary_factor)
  # The blend weight original_max / wavelength - low_freq_factor cancels near the band's edge and
  # magnifies an ulp of difference between XLA's and PyTorch's pow up to factor-fold; so compare
  # each frequency's scale (between 1/factor and 1) to 1e-6 rather than the frequency itself.
  dim = int(head_dim * partial_rotary_factor)
  unscaled = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
  np.testing.assert_allclose(np.asarray(inv_freq) / unscaled, expected_inv_freq.numpy() / unscaled,
                             rtol=0, atol=1e-6)
  assert inv_freq.dtype == np.float32
  assert attention_factor == expected_attention_factor == 1.0


@pytest.mark.parametrize('length', ['unset', 'short', 'original', 'long'])
@pytest.mark.parametrize('factor_given', [True, False])
@pytest.mark.parametrize('attention_given', [True, False])
def test_longrope_matches_hf(rng, length, factor_given, attention_given):
  head_dim, theta, partial_rotary_factor = draw_head(rng)
  pairs = int(head_dim * partial_rotary_factor) // 2
  original_max = int(rng.integers(256, 8192))
  max_position_embeddings = int(original_max * rng.uniform(1.0, 32.0))
  scaling = {'rope_type': 'longrope', 'original_max_position_embeddings': original_max,
             'short_factor': rng.uniform(1.0, 4.0, pairs).tolist(),
             'long_factor': rng.uniform(1.0, 64.0, pairs).tolist()}
  if factor_given:
    scaling['factor'] = float(rng.uniform(1.0, 32.0))
  if attention_given:
    scaling['attention_factor'] = float(rng.uniform(0.5, 2.0))
  seq_len = {'unset': None, 'short': int(rng.integers(1, original_max)), 'original': original_max,
             'long': int(rng.integers(original_max + 1, max_position_embeddings + 2))}[length]
  config = hf_rope_config(head_dim, theta, partial_rotary_factor, scaling, max_position_embeddings)
  expected = ROPE_INIT_FUNCTIONS['longrope'](config, device='cpu', seq_len=seq_len)
  ours = rope_frequencies(head_dim, theta, scaling, partial_rotary_factor=partial_rotary_factor,
                          max_position_embeddings=max_position_embeddings, seq_len=seq_len)
  assert_close_to(ours, expected)


@pytest.mark.parametrize('rope_type', ['dynamic', 'longrope'])
def test_traced_seq_len_matches_hf(rng, rope_type):
  head_dim, theta, _ = draw_head(rng)
  max_position_embeddings = int(rng.integers(128, 4096))
  scaling = {'rope_type': rope_type, 'factor': float(rng.uniform(1.0, 8.0))}
  if rope_type == 'longrope':
    scaling.update(original_max_position_embeddings=max_position_embeddings,
                   short_factor=rng.uniform(1.0, 4.0, head_dim // 2).tolist(),
                   long_factor=rng.uniform(1.0, 64.0, head_dim // 2).tolist())
  config = hf_rope_config(head_dim, theta, 1.0, scaling, max_position_embeddings)
  frequencies = jax.jit(lambda seq_len: rope_frequencies(
      head_dim, theta, scaling, max_position_embeddings=max_position_embeddings,
      seq_len=seq_len)[0])
  for seq_len in (int(rng.integers(1, max_position_embeddings + 1)),
                  int(rng.integers(max_position_embeddings + 1, 4 * max_position_embeddings))):
    expected, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device='cpu', seq_len=seq_len)
    np.testing.assert_allclose(np.asarray(frequencies(seq_len)), expected.numpy(), rtol=1e-6)


def test_theta_and_fraction_inside_the_dict_win(rng):
  head_dim, theta, partial_rotary_factor = draw_head(rng)
  scaling = {'rope_type': 'linear', 'factor': float(rng.uniform(1.0, 8.0)),
             'rope_theta': theta, 'partial_rotary_factor': partial_rotary_factor}
  config = hf_rope_config(head_dim, theta, partial_rotary_factor, scaling, 2048)
  expected = ROPE_INIT_FUNCTIONS['linear'](config, device='cpu')
  assert_close_to(rope_frequencies(head_dim, 10_000.0, scaling), expected)


def test_missing_original_length_falls_back_to_max_position_embeddings(rng):
  scaling = {'rope_type': 'yarn', 'factor': float(rng.uniform(1.0, 16.0))}
  check_against_hf(rng, scaling, max_position_embeddings=int(rng.integers(256, 8192)))


@pytest.mark.parametrize('scaling, max_position_embeddings, named', [
    ({'rope_type': 'rotary_magic', 'factor': 2.0}, 2048, 'rotary_magic'),
    ({'type': 'xpos', 'factor': 2.0}, 2048, 'xpos'),
    ({'rope_type': 'linear'}, 2048, 'factor'),
    ({'rope_type': 'ntk'}, 2048, 'factor'),
    ({'rope_type': 'dynamic'}, 2048, 'factor'),
    ({'rope_type': 'dynamic', 'factor': 2.0}, None, 'max_position_embeddings'),
    ({'rope_type': 'yarn', 'original_max_position_embeddings': 1024}, 2048, 'factor'),
    ({'rope_type': 'yarn', 'factor': 2.0}, None, 'original_max_position_embeddings'),
    ({'rope_type': 'llama3', 'factor': 8.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192}, 65536, 'low_freq_factor'),
    ({'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 4.0, 'high_freq_factor': 1.0,
      'original_max_position_embeddings': 8192}, 65536, 'high_freq_factor'),
    ({'rope_type': 'longrope', 'long_factor': [1.0] * 8,
      'original_max_position_embeddings': 1024}, 4096, 'short_factor'),
    ({'rope_type': 'longrope', 'short_factor': [1.0] * 8, 'long_factor': [1.0] * 7,
      'original_max_position_embeddings': 1024}, 4096, 'long_factor'),
    ({'rope_type': 'longrope', 'short_factor': [1.0] * 8, 'long_factor': [1.0] * 8,
      'original_max_position_embeddings': 1024}, None, 'max_position_embeddings'),
])
def test_bad_scaling_names_the_problem(scaling, max_position_embeddings, named):
  with pytest.raises(ConfigError, match=named):
    rope_frequencies(16, 10_000.0, scaling, max_position_embeddings=max_position_embeddings)
