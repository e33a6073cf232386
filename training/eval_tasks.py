"""The built-in evaluation tasks: `--mode=eval --tasks=...`, and `--eval_tasks=...` during
training (logged as eval/<task>/<metric>). No dependency beyond lmlab's own.

  bpb                 bits per byte of the evaluation text, and its byte, word and token
                      perplexities: a run's tokenizer does not change the first three, so
                      runs with different tokenizers compare
  lambada_style       last-word prediction in the style of LAMBADA (Paperno et al. 2016): each
                      paragraph of the evaluation text, its last word scored after the rest;
                      acc (the greedy continuation is the word) and perplexity
  lambada_style:<f>   the same over the "text" field of each line of the JSONL file f
  mc:<f>              multiple choice over the JSONL file f, a question per line:
                      {"context": str, "choices": [str, ...], "label": index of the answer};
                      acc picks the choice of highest log-likelihood, acc_norm the highest
                      per character (lm-evaluation-harness's acc and acc_norm)

The evaluation text is the run's validation split or --data, its documents in order up to a
token budget. Every document and passage is scored from the tokenizer's end-of-text token on,
in windows of at most max_len tokens (training/scoring.py); choices and last words follow
their context after a space.
"""
import dataclasses
import json
import math
import os
import re

import numpy as np

from lmlab.data import corpus as corpus_lib
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.data.errors import DataError
from lmlab.models.errors import ConfigError
from lmlab.training import scoring

USAGE = ('tasks are a comma-separated list of bpb, lambada_style, lambada_style:<file.jsonl> '
         'and mc:<file.jsonl>')


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str             # 'bpb', 'lambada_style' or 'mc'
  path: str | None      # The JSONL file it reads; None: the evaluation text.
  examples: list | None = None  # The file's passages or questions.

  @property
  def name(self) -> str:
    """Its name in metric keys: bpb, lambada_style, or <kind>_<the file's stem>."""
    if self.path is None:
      return self.kind
    return f'{self.kind}_{os.path.splitext(os.path.basename(self.path))[0]}'


def parse(spec: str, flag: str = '--tasks') -> list[Task]:
  """The tasks of a comma-separated spec, their files read and checked."""
  tasks = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    kind, _, path = item.partition(':')
    if item in ('bpb', 'lambada_style'):
      tasks.append(Task(item, None))
    elif kind in ('lambada_style', 'mc') and path:
      if not os.path.isfile(path):
        raise DataError(f'{flag}: {path} does not exist; {kind}:<file> reads a JSONL file')
      tasks.append(Task(kind, path, multiple_choice(path) if kind == 'mc' else
                        [r['text'] for r in _jsonl(path, {'text': _text})]))
    else:
      raise ConfigError(f'{flag}: unknown task {item!r}; {USAGE}')
  names = [t.name for t in tasks]
  if not tasks or len(set(names)) < len(names):
    raise ConfigError(f'{flag}={spec!r}: ' + ('no task given' if not tasks else
                                              'a task named twice') + f'; {USAGE}')
  return tasks


def evaluation_text(documents: list[corpus_lib.Document], tokenizer,
                    max_tokens: int) -> list[str]:
  """The texts of `documents` in order, about max_tokens tokens in all: the document that
  would pass the budget ends at its last line break within it (with none, at the budget, on a
  whole character), and the rest are left out."""
  texts, left = [], max_tokens
  for document in documents:
    text = ''.join(piece for piece, _ in corpus_lib.text_chunks(document))
    tokens = tokenizer.encode_ordinary(text)
    if len(tokens) > left:
      head = tokenizer.decode_bytes(tokens[:left])
      lines = head[:head.rfind(b'\n') + 1]
      # A prefix of UTF-8: only a character cut at its end is incomplete.
      text = (lines or head).decode('utf-8', errors='ignore')
      left = 0
    else:
      left -= len(tokens)
    if text:
      texts.append(text)
    if not left:
      break
  if not texts:
    raise DataError('the evaluation text is empty (no document); pass --data')
  return texts


def _jsonl(path: str, fields: dict, problem=lambda record: None) -> list[dict]:
  """The lines of a JSONL file, each an object with `fields` ({name: check(value) -> bool})
  in which problem(record) finds nothing (else it returns what is wrong); a bad line is an
  error naming it."""
  records = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise DataError(f'{path} line {number}: not JSON ({e})') from None
      for name, check in fields.items():
        if not isinstance(record, dict) or name not in record or not check(record[name]):
          raise DataError(f'{path} line {number}: needs "{name}": ' + check.__doc__)
      if problem(record):
        raise DataError(f'{path} line {number}: {problem(record)}')
      records.append(record)
  if not records:
    raise DataError(f'{path} has no examples')
  return records


def _text(value) -> bool:
  """a string"""
  return isinstance(value, str)


def _choices(value) -> bool:
  """a list of two or more strings"""
  return isinstance(value, list) and len(value) >= 2 and all(isinstance(c, str) for c in value)


def _index(value) -> bool:
  """the index of the right choice"""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def multiple_choice(path: str) -> list[dict]:
  def label_out_of_range(record):
    if record['label'] >= len(record['choices']):
      return f'label {record["label"]} is not an index of its {len(record["choices"])} choices'
  return _jsonl(path, {'context': _text, 'choices': _choices, 'label': _index},
                label_out_of_range)


def paragraphs(texts: list[str]) -> list[str]:
  """The blocks between blank lines of texts."""
  return [p for text in texts for p in re.split(r'\n\s*\n', text)]


class Suite:
  """Tasks scored in batches of batch_size requests of at most max_len tokens; texts() gives
  the evaluation text (called once, when a task first needs it)."""

  def __init__(self, tasks: list[Task], tokenizer, texts, *, batch_size: int, max_len: int):
    self.tasks, self.tokenizer, self._texts, self._text = tasks, tokenizer, texts, None
    self.batch_size, self.max_len = batch_size, max_len
    self.prefix = tokenizer_lib.separator_id(tokenizer)

  def texts(self) -> list[str]:
    if self._text is None:
      self._text = self._texts()
    return self._text

  def run(self, graphdef, params) -> dict[str, dict[str, float]]:
    """{task name: {metric: value}} of the model."""
    scorer = scoring.Scorer(graphdef, params, batch_size=self.batch_size, max_len=self.max_len)
    return {task.name: getattr(self, '_' + task.kind)(task, scorer) for task in self.tasks}

  def _bpb(self, task, scorer):
    del task
    texts = self.texts()
    requests = [scoring.rolling(self.tokenizer.encode_ordinary(text), scorer.max_len,
                                self.prefix) for text in texts]
    nll = -sum(s.logprob for s in scorer([r for rs in requests for r in rs]))
    n_bytes = sum(len(text.encode('utf-8')) for text in texts)
    n_words = sum(len(text.split()) for text in texts)
    n_tokens = sum(r.n_scored for rs in requests for r in rs)
    return {'bits_per_byte': nll / n_bytes / math.log(2),
            'byte_perplexity': math.exp(nll / n_bytes),
            'word_perplexity': math.exp(min(nll / max(n_words, 1), 700)),
            'token_perplexity': math.exp(min(nll / n_tokens, 700))}

  def _lambada_style(self, task, scorer):
    passages = task.examples if task.path else paragraphs(self.texts())
    passages = [p.strip() for p in passages if ' ' in p.strip()]
    if not passages:
      raise DataError(f'{task.path or "the evaluation text"} has no passage with a space '
                      'before its last word')
    requests = []
    for passage in passages:
      context, word = passage.rsplit(' ', 1)
      requests.append(scoring.pair(self.tokenizer, context, ' ' + word, self.prefix))
    scores = scorer(requests)
    return {'acc': float(np.mean([s.greedy for s in scores])),
            'perplexity': math.exp(min(-np.mean([s.logprob for s in scores]), 700))}

  def _mc(self, task, scorer):
    examples = task.examples
    requests = [scoring.pair(self.tokenizer, e['context'], ' ' + choice, self.prefix)
                for e in examples for choice in e['choices']]
    scores, at, right, right_norm = scorer(requests), 0, 0, 0
    for e in examples:
      logprob = np.array([s.logprob for s in scores[at:at + len(e['choices'])]])
      at += len(e['choices'])
      lengths = np.array([max(len(c), 1) for c in e['choices']], np.float64)
      right += int(np.argmax(logprob)) == e['label']
      right_norm += int(np.argmax(logprob / lengths)) == e['label']
    return {'acc': right / len(examples), 'acc_norm': right_norm / len(examples)}


def for_run(spec: str, run, tokenizer, *, documents=None, eval_batches: int | None = None,
            flag: str = '--tasks') -> Suite:
  """The suite of `spec` for a run (a TrainConfig): its evaluation text is `documents`
  (default: the run's validation split), eval_batches (default: the run's) micro-batches of
  seq_len tokens of it; requests are scored a micro-batch at a time, seq_len tokens at most."""
  tasks = parse(spec, flag)
  if documents is None:
    documents = corpus_lib.split_corpus(run.data, run.val_fraction)['val']
  max_tokens = (eval_batches or run.eval_batches) * run.micro_batch_size * run.seq_len
  return Suite(tasks, tokenizer, lambda: evaluation_text(documents, tokenizer, max_tokens),
               batch_size=run.micro_batch_size, max_len=run.seq_len)


def flat(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """{eval/<task>/<metric>: value}, the keys of the training log."""
  return {f'eval/{task}/{metric}': value for task, metrics in results.items()
          for metric, value in metrics.items()}
