"""BERT and RoBERTa in transformers: BertModel, BertForMaskedLM, BertForPreTraining and
RobertaForMaskedLM, as our models.bert.Bert.

All are post-LN encoders with biases everywhere, a LayerNorm after the word + position +
token-type embeddings, and heads that the architecture fixes: the pooler (BertModel,
BertForPreTraining), the masked-LM head (with the decoder tied to the word embeddings
unless tie_word_embeddings is false) and the next-sentence head (BertForPreTraining).
RoBERTa's position ids start at pad_token_id + 1 and count only real tokens: our
position_offset.
"""
from lmlab.models.errors import CheckpointError
from lmlab.models.hf.architecture import Architecture, Link, copy, field, linear, refuse
from lmlab.models.hf.bloom import layer_norm

FIXED = dict(family='encoder', causal=False, norm='layernorm', norm_placement='post',
             position='learned', use_bias=True, qkv_bias=True, embed_norm=True, qk_norm=False,
             parallel_block=False, attention_scale='inv_sqrt_d', attention_type='mha',
             head='dense', sliding_window=0, head_dim=0, n_labels=0)
# hidden_act values and our MLP of the same activation; to_hf writes the first name of each.
ACTIVATIONS = {'gelu': 'gelu', 'relu': 'relu', 'gelu_new': 'gelu_tanh',
               'gelu_pytorch_tanh': 'gelu_tanh'}
# Buffers, the tied decoder stored beside the embeddings, and heads a task leaves unused.
IGNORED = ('embeddings.position_ids', 'embeddings.token_type_ids',
           'predictions.decoder.weight', 'predictions.decoder.bias', 'lm_head.decoder.weight',
           'lm_head.decoder.bias')
UNUSED_PRETRAINING_HEADS = ('pooler.dense.weight', 'pooler.dense.bias',
                            'cls.seq_relationship.weight', 'cls.seq_relationship.bias')


def from_hf(hf_config: dict) -> dict:
  refuse(hf_config, 'position_embedding_type', ('absolute',),
         'positions are one learned absolute table')
  refuse(hf_config, 'is_decoder', (False,), 'the encoder attends both ways')
  refuse(hf_config, 'add_cross_attention', (False,), 'the encoder has no cross-attention')
  refuse(hf_config, 'hidden_act', tuple(ACTIVATIONS), 'the MLP activation must be one of '
         + ', '.join(ACTIVATIONS))
  n_heads = field(hf_config, 'num_attention_heads')
  return dict(vocab_size=field(hf_config, 'vocab_size'), d_model=field(hf_config, 'hidden_size'),
              n_layers=field(hf_config, 'num_hidden_layers'), n_heads=n_heads,
              n_kv_heads=n_heads, ffn_dim=field(hf_config, 'intermediate_size'),
              max_seq_len=field(hf_config, 'max_position_embeddings'),
              norm_eps=field(hf_config, 'layer_norm_eps', 1e-12, expected=float),
              type_vocab_size=field(hf_config, 'type_vocab_size', 2),
              mlp=ACTIVATIONS[field(hf_config, 'hidden_act', 'gelu', expected=str)],
              tie_embeddings=field(hf_config, 'tie_word_embeddings', True, expected=bool))


def to_hf(config) -> dict:
  names = {ours: name for name, ours in reversed(ACTIVATIONS.items())}
  if config.mlp not in names:
    raise CheckpointError(f'BERT cannot express mlp={config.mlp!r} (only '
                          f'{", ".join(sorted(names))})')
  return dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              intermediate_size=config.ffn_dim, max_position_embeddings=config.max_seq_len,
              layer_norm_eps=config.norm_eps, type_vocab_size=config.type_vocab_size,
              hidden_act=names[config.mlp], tie_word_embeddings=config.tie_embeddings,
              position_embedding_type='absolute', is_decoder=False, pad_token_id=0)


def roberta_from_hf(hf_config: dict) -> dict:
  return dict(from_hf(hf_config), position_offset=field(hf_config, 'pad_token_id', 1) + 1)


def roberta_to_hf(config) -> dict:
  if config.position_offset < 1:
    raise CheckpointError(f'RoBERTa cannot express position_offset={config.position_offset} '
                          '(positions start at pad_token_id + 1 >= 1)')
  return dict(to_hf(config), pad_token_id=config.position_offset - 1, bos_token_id=0,
              eos_token_id=2)


def encoder_links(prefix: str, config) -> list:
  """The embeddings, the layers and the pooler under `prefix` ('bert.', 'roberta.', '')."""
  embeddings = prefix + 'embeddings.'
  links = [copy(embeddings + 'word_embeddings.weight', ('embed', 'embedding')),
           copy(embeddings + 'position_embeddings.weight', ('positions', 'table', 'embedding')),
           copy(embeddings + 'token_type_embeddings.weight', ('token_types', 'embedding')),
           *layer_norm(embeddings + 'LayerNorm', ('embed_norm',))]
  for i in range(config.n_layers):
    hf, ours = f'{prefix}encoder.layer.{i}.', ('blocks', i)
    for hf_name, name in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      links += linear(hf + 'attention.self.' + hf_name, ours + ('attention', name), bias=True)
    links += linear(hf + 'attention.output.dense', ours + ('attention', 'o_proj'), bias=True)
    links += layer_norm(hf + 'attention.output.LayerNorm', ours + ('attn_sum_norm',))
    links += linear(hf + 'intermediate.dense', ours + ('mlp', 'up'), bias=True)
    links += linear(hf + 'output.dense', ours + ('mlp', 'down'), bias=True)
    links += layer_norm(hf + 'output.LayerNorm', ours + ('mlp_sum_norm',))
  if config.pooler:
    links += linear(prefix + 'pooler.dense', ('pooler',), bias=True)
  return links


def mlm_links(dense: str, norm: str, bias: str, decoder: str, config) -> list:
  links = [*linear(dense, ('mlm', 'dense'), bias=True), *layer_norm(norm, ('mlm', 'norm'))]
  if config.tie_embeddings:
    return links + [copy(bias, ('mlm', 'bias'))]
  # Untied, transformers keeps two output biases and adds only the decoder's; both are
  # written so that either reading of the checkpoint finds our bias.
  return links + linear(decoder, ('mlm', 'decoder'), bias=False) + [
      Link((bias, decoder + '.bias'), (('mlm', 'bias'),), lambda arrays: [arrays[1]],
           lambda arrays: [arrays[0], arrays[0]])]


def bert_mlm_links(config) -> list:
  return mlm_links('cls.predictions.transform.dense', 'cls.predictions.transform.LayerNorm',
                   'cls.predictions.bias', 'cls.predictions.decoder', config)


BERT_MODEL = Architecture(
    'BertModel', 'bert', dict(FIXED, pooler=True, mlm_head=False, nsp_head=False,
                              position_offset=0),
    from_hf, to_hf, lambda config: encoder_links('', config), ignored=IGNORED)
BERT_MASKED_LM = Architecture(
    'BertForMaskedLM', 'bert', dict(FIXED, pooler=False, mlm_head=True, nsp_head=False,
                                    position_offset=0),
    from_hf, to_hf, lambda config: encoder_links('bert.', config) + bert_mlm_links(config),
    ignored=IGNORED + UNUSED_PRETRAINING_HEADS)
BERT_PRETRAINING = Architecture(
    'BertForPreTraining', 'bert', dict(FIXED, pooler=True, mlm_head=True, nsp_head=True,
                                       position_offset=0),
    from_hf, to_hf,
    lambda config: (encoder_links('bert.', config) + bert_mlm_links(config)
                    + linear('cls.seq_relationship', ('nsp',), bias=True)),
    ignored=IGNORED)
ROBERTA_MASKED_LM = Architecture(
    'RobertaForMaskedLM', 'roberta', dict(FIXED, pooler=False, mlm_head=True, nsp_head=False),
    roberta_from_hf, roberta_to_hf,
    lambda config: (encoder_links('roberta.', config)
                    + mlm_links('lm_head.dense', 'lm_head.layer_norm', 'lm_head.bias',
                                'lm_head.decoder', config)),
    ignored=IGNORED + ('pooler.dense.weight', 'pooler.dense.bias'))
