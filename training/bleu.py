"""Corpus BLEU (Papineni et al. 2002): the geometric mean of modified n-gram precisions
(n = 1..4) pooled over the corpus, times the brevity penalty, in percent."""
import collections
import math


def _ngrams(words, n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses, references, max_n: int = 4) -> float:
  """BLEU of tokenised hypotheses against one tokenised reference each; 0 when some
  n-gram order has no match."""
  matches, totals = [0] * max_n, [0] * max_n
  hypothesis_length = reference_length = 0
  for hypothesis, reference in zip(hypotheses, references, strict=True):
    hypothesis_length += len(hypothesis)
    reference_length += len(reference)
    for n in range(1, max_n + 1):
      counts, reference_counts = _ngrams(hypothesis, n), _ngrams(reference, n)
      matches[n - 1] += sum(min(c, reference_counts[g]) for g, c in counts.items())
      totals[n - 1] += max(len(hypothesis) - n + 1, 0)
  if not all(matches) or not hypothesis_length:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
  brevity = min(0.0, 1.0 - reference_length / hypothesis_length)
  return 100.0 * math.exp(log_precision + brevity)
