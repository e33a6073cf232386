"""BERT pre-training batches: sentence pairs with next-sentence labels, and masked tokens.

Documents are token arrays. A pair is `[CLS] A [SEP] B [SEP]`, where A is a span of a
document and B is, half of the time, the span that follows it (is_random_next 0) and
otherwise a span of another document (1), as in Devlin et al. 2019. The RoBERTa variant
(Liu et al. 2019) drops the pair: one contiguous span of the token stream per row.

Masking (Devlin et al. 2019): each ordinary token is selected with probability 0.15; a
selected token becomes [MASK] with probability 0.8, a random ordinary token with 0.1, and
stays itself with 0.1. Dynamic masking (RoBERTa) draws a fresh mask every time a sample is
used; static masking fixes each sample's mask once.

Every sample is a pure function of (seed, sample index), and the indices of a step a pure
function of (seed, step), so batches are the same on every run and after resuming.
"""
import dataclasses

import numpy as np

from lmlab.data.errors import DataError

NOT_SELECTED = -1  # The label of a position that is not predicted.


@dataclasses.dataclass(frozen=True)
class BertSpecials:
  pad: int
  cls: int
  sep: int
  mask: int


def mask_tokens(tokens, maskable, rng, *, mask_id: int, replacement_ids, select_prob=0.15):
  """(masked tokens, labels): labels hold the original id where selected, else NOT_SELECTED."""
  selected = maskable & (rng.random(tokens.shape) < select_prob)
  action = rng.random(tokens.shape)
  masked = np.where(selected & (action < 0.8), mask_id, tokens)
  randomised = selected & (action >= 0.8) & (action < 0.9)
  masked = np.where(randomised, rng.choice(replacement_ids, size=tokens.shape), masked)
  return masked.astype(np.int32), np.where(selected, tokens, NOT_SELECTED).astype(np.int32)


def _span(rng, document, length):
  start = int(rng.integers(0, max(len(document) - length, 0) + 1))
  return document[start:start + length]


def sentence_pair(documents, pairable, rng, *, budget: int):
  """(A, B, is_random_next) with len(A) + len(B) <= budget, drawn with `rng`.

  `pairable` lists the documents of two or more tokens, which can supply a true next span.
  """
  max_a = max(budget // 2, 1)
  if rng.random() < 0.5:
    document = documents[pairable[int(rng.integers(len(pairable)))]]
    len_a = int(rng.integers(1, min(max_a, len(document) - 1) + 1))
    start = int(rng.integers(0, len(document) - len_a))  # Leaves B at least one token.
    return (document[start:start + len_a], document[start + len_a:start + budget], 0)
  a_index = int(rng.integers(len(documents)))
  b_index = int(rng.integers(len(documents) - 1))
  b_index += b_index >= a_index  # Any document but A's.
  a = _span(rng, documents[a_index], int(rng.integers(1, max_a + 1)))
  return a, _span(rng, documents[b_index], budget - len(a)), 1


class BertBatches:
  """batch(step) -> dict of int32 arrays [B, T] (labels included), and 'is_random_next' [B]."""

  def __init__(self, documents, specials: BertSpecials, *, seq_len: int, batch_size: int,
               seed: int, replacement_ids, next_sentence=True, dynamic_masking=True,
               num_samples=1 << 30):
    documents = [np.asarray(d) for d in documents if len(d)]
    pairable = [i for i, d in enumerate(documents) if len(d) >= 2]
    if not documents or (next_sentence and (len(documents) < 2 or not pairable)):
      raise DataError('BERT pre-training with next-sentence pairs needs two or more '
                      'documents, one of them at least two tokens long; pass more data')
    if seq_len < 5:
      raise DataError(f'seq_len={seq_len} leaves no room for [CLS] A [SEP] B [SEP]')
    self.documents, self.pairable, self.specials = documents, pairable, specials
    self.stream = np.concatenate(documents)
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.replacement_ids = np.asarray(replacement_ids)
    self.next_sentence, self.dynamic_masking = next_sentence, dynamic_masking
    self.num_samples = num_samples

  def sample(self, index: int):
    """(tokens, token_type_ids, is_random_next) of sample `index`, unpadded."""
    rng = np.random.default_rng([self.seed, index, 0])
    s = self.specials
    if not self.next_sentence:
      span = _span(rng, self.stream, self.seq_len - 2)
      tokens = np.concatenate([[s.cls], span, [s.sep]])
      return tokens, np.zeros_like(tokens), 0
    a, b, is_random_next = sentence_pair(self.documents, self.pairable, rng,
                                         budget=self.seq_len - 3)
    tokens = np.concatenate([[s.cls], a, [s.sep], b, [s.sep]])
    types = np.concatenate([np.zeros(len(a) + 2, int), np.ones(len(b) + 1, int)])
    return tokens, types, is_random_next

  def batch(self, step: int):
    indices = np.random.default_rng([self.seed, step, 1]).integers(0, self.num_samples,
                                                                   self.batch_size)
    s = self.specials
    out = {name: np.full((self.batch_size, self.seq_len), fill, np.int32) for name, fill in
           (('inputs', s.pad), ('token_type_ids', 0), ('attention_mask', 0),
            ('labels', NOT_SELECTED))}
    out['is_random_next'] = np.zeros(self.batch_size, np.int32)
    for row, index in enumerate(indices):
      tokens, types, is_random_next = self.sample(int(index))
      mask_rng = np.random.default_rng([self.seed, int(index), 2] +
                                       ([step, row] if self.dynamic_masking else []))
      maskable = ~np.isin(tokens, [s.cls, s.sep, s.pad])
      masked, labels = mask_tokens(tokens, maskable, mask_rng, mask_id=s.mask,
                                   replacement_ids=self.replacement_ids)
      n = len(tokens)
      out['inputs'][row, :n], out['labels'][row, :n] = masked, labels
      out['token_type_ids'][row, :n], out['attention_mask'][row, :n] = types, 1
      out['is_random_next'][row] = is_random_next
    return out
