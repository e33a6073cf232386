"""distinct-n and the reward against repetition, against counts made here from the words."""
import collections

from lmlab.training import repetition

VOCABULARY = ['self', 'x', '=', '.', '(', ')', 'return', 'value', '_y', '42', ':', ',']


def random_words(rng, n: int, vocabulary: int) -> list[str]:
  return [VOCABULARY[i] for i in rng.integers(0, vocabulary, n)]


def joined(words: list[str]) -> str:
  """The words as text that splits back into them: spaces between word characters only."""
  text = ''
  for word in words:
    if text and (text[-1].isalnum() or text[-1] == '_') and (word[0].isalnum() or word[0] == '_'):
      text += ' '
    text += word
  return text


def test_distinct_n_is_the_share_of_distinct_ngrams(rng):
  for _ in range(20):
    words = random_words(rng, int(rng.integers(0, 30)), int(rng.integers(1, len(VOCABULARY))))
    text = joined(words)
    assert repetition.words(text) == words
    for n in (1, 2, 3):
      grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
      expected = len(collections.Counter(grams)) / len(grams) if grams else 0.0
      assert repetition.distinct_n(text, n) == expected


def test_the_reward_is_minus_the_repeats_of_bigrams_whatever_the_length(rng):
  for _ in range(20):
    words = random_words(rng, int(rng.integers(0, 40)), int(rng.integers(1, len(VOCABULARY))))
    counts = collections.Counter(zip(words, words[1:]))
    assert repetition.reward('p', joined(words)) == -sum(c - 1 for c in counts.values())
  distinct = [f'w{i}' for i in rng.permutation(100)[:int(rng.integers(1, 100))]]
  assert repetition.reward('p', ' '.join(distinct)) == 0.0
