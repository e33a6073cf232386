"""Sums of two numbers: a task whose replies a program judges exactly, for alignment.

  prompt 'a+b='   reply the decimal sum   reward 1.0 for the sum, else 0.0

--data=synthetic:arithmetic gives the SFT, reward and DPO objectives every problem with
operands 0..99 (10,000), in one fixed order; like the lines of a file, the last
--val_fraction of them are held out. SFT trains on prompt -> sum; a preference pair has the
sum as its chosen reply and a wrong one near it as its rejected reply: the sum off by 1 to 10,
or with one digit changed.
"""
import numpy as np

from lmlab.data.errors import DataError

SYNTHETIC = 'synthetic:arithmetic'
MAX_OPERAND = 99


def problems() -> list[tuple[int, int]]:
  """Every (a, b) with operands 0..MAX_OPERAND, in the task's fixed order."""
  pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
  return [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]


def prompt_of(a: int, b: int) -> str:
  return f'{a}+{b}='


def _operands(prompt: str) -> tuple[int, int]:
  a, plus, rest = prompt.partition('+')
  b, equals, tail = rest.partition('=')
  if not (plus and equals and not tail and a.isdigit() and b.isdigit()):
    raise DataError(f'{prompt!r} is not an arithmetic prompt "a+b="')
  return int(a), int(b)


def answer(prompt: str) -> int:
  """The sum an 'a+b=' prompt asks for."""
  a, b = _operands(prompt)
  return a + b


def reward(prompt: str, completion: str) -> float:
  """1.0 when the completion is the sum the prompt asks for (surrounding spaces aside)."""
  return float(completion.strip() == str(answer(prompt)))


def wrong_answer(a: int, b: int, rng: np.random.Generator) -> int:
  """A non-negative number near a + b that is not a + b."""
  total = a + b
  while True:
    if rng.random() < 0.5:
      wrong = total + int(rng.choice([-1, 1])) * int(rng.integers(1, 11))
    else:
      digits = list(str(total))
      digits[int(rng.integers(len(digits)))] = str(rng.integers(10))
      wrong = int(''.join(digits))
    if wrong >= 0 and wrong != total:
      return wrong


def sft_examples() -> list[dict]:
  """{'prompt', 'completion'} of every problem, in the task's order."""
  return [{'prompt': prompt_of(a, b), 'completion': str(a + b)} for a, b in problems()]


def preference_examples() -> list[dict]:
  """{'prompt', 'chosen', 'rejected'} of every problem, in the task's order."""
  rng = np.random.default_rng(1)
  return [{'prompt': prompt_of(a, b), 'chosen': str(a + b),
           'rejected': str(wrong_answer(a, b, rng))} for a, b in problems()]
