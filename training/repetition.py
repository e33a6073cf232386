"""Repetition in generated text, measured on words: distinct-n and a reward against repeats.

Words are runs of letters, digits and underscores, and single punctuation marks ('self.x'
is three). distinct-n is the share of a text's word n-grams that are distinct (Li et al.
2016): 1 when nothing repeats, near 0 for a text that loops on one phrase.

`reward` (prompt, completion) -> minus the number of the completion's word bigrams that
repeat an earlier one: 0 for a reply without repeats, however long or short, so that the
only way to a higher reward is to repeat less (a reward per distinct bigram would pay for
length, and one of distinct-n would pay for stopping early). It is the reward of
--objective=grpo --reward=lmlab.training.repetition:reward.
"""
import re

_WORD = re.compile(r'\w+|[^\w\s]')


def words(text: str) -> list[str]:
  return _WORD.findall(text)


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
  tokens = words(text)
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int) -> float:
  """Distinct n-grams over n-grams; 0.0 for a text of fewer than n words."""
  grams = ngrams(text, n)
  return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngrams(text: str, n: int) -> int:
  """How many of the text's word n-grams repeat an earlier one."""
  grams = ngrams(text, n)
  return len(grams) - len(set(grams))


def reward(prompt: str, completion: str) -> float:
  del prompt
  return -float(repeated_ngrams(completion, 2))
